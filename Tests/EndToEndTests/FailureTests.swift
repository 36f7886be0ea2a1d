import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Synchronization
import Testing

/// Upstreams that refuse, stall or reset, and connections that go idle.
@Suite("Failures", .serialized)
struct FailureTests {
    @Test("Refused upstream: the client is reset within the connect timeout, the log names the cause")
    func refused() throws {
        let closedPort = try freePort()
        let (relay, listen) = try startRelay(upstreams: ["127.0.0.1:\(closedPort)"], ["--connect-timeout", "2s"])
        defer { relay.stop() }
        let start = ContinuousClock.now
        #expect(try endOfTurnedAway(listen) == .reset, "connect-failed is a failure: reset, not FIN")
        #expect(ContinuousClock.now - start < .seconds(2))
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("end", in: line) == "connect-failed")
        #expect(line.contains("127.0.0.1:\(closedPort): connect: Connection refused (errno 111)"))
    }

    @Test("Unresponsive upstream: the connect times out and the client is reset")
    func unresponsive() throws {
        // A listener with a full accept queue drops new SYNs: the connect can only time out.
        let stalled = try TestSocket.tcp(ipv6: false)
        try stalled.bind(Endpoint(.loopbackV4, 0))
        #expect(Glibc.listen(stalled.fd, 0) == 0)
        let target = try #require(stalled.localEndpoint)
        let filler = try TestSocket.connect(to: target)
        defer { filler.close(); stalled.close() }
        let (relay, listen) = try startRelay(upstreams: [target.description], ["--connect-timeout", "1s"])
        defer { relay.stop() }
        let client = try TestSocket.connect(to: listen)
        let start = ContinuousClock.now
        #expect(try client.waitForEnd(timeout: .seconds(5)) == .reset, "connect-failed is a failure: reset, not FIN")
        let elapsed = ContinuousClock.now - start
        #expect(elapsed >= .milliseconds(900) && elapsed < .seconds(3), "closed after \(elapsed)")
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("end", in: line) == "connect-failed")
        #expect(line.contains("connect timed out after 1s"))
    }

    /// In a namespace of the test's own, 127.0.0.99 has an `unreachable` route:
    ///
    ///   client ──▶ relay 127.0.0.1:P ──✗ 127.0.0.99:9 (EHOSTUNREACH)
    @Test("Unreachable upstream: the client is reset at once, the log names the cause")
    func unreachable() throws {
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        try namespace.run(["ip", "route", "add", "unreachable", "127.0.0.99/32", "table", "local"])
        let relay = try RelayProcess(
            ["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.99:9", "--connect-timeout", "3s"],
            prefix: namespace.prefix)
        defer { relay.stop() }
        try relay.waitUntilListening()
        let start = ContinuousClock.now
        #expect(try namespace.withThread { try endOfTurnedAway(Endpoint(.loopbackV4, 7000)) } == .reset, "connect-failed is a failure: reset, not FIN")
        #expect(ContinuousClock.now - start < .seconds(1))
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("end", in: line) == "connect-failed")
        #expect(line.contains("127.0.0.99:9: connect: No route to host (errno 113)"))
    }

    @Test("Every address of the upstream is tried in order")
    func fallsThroughAddresses() throws {
        // The name resolves to 127.0.0.1 first (glibc sorts the address sharing the longest prefix
        // with the source first), where nothing listens, then to 127.0.0.2, where the upstream is.
        let upstream = try TestServer(Endpoint(IPAddress("127.0.0.2")!, 0), handler: TestServer.echo)
        defer { upstream.stop() }
        let refused = Endpoint(.loopbackV4, upstream.endpoint.port)
        let hosts = FileManager.default.temporaryDirectory.appendingPathComponent("sameport-hosts-\(getpid())")
        try "127.0.0.2 two.sameport.test\n127.0.0.1 two.sameport.test\n".write(to: hosts, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: hosts) }
        let port = try freePort()
        let relay = try RelayProcess(
            ["--listen", "127.0.0.1:\(port)", "--upstream", "two.sameport.test:\(upstream.endpoint.port)"],
            prefix: ["unshare", "--mount", "--propagation", "private",
                     "sh", "-c", "mount --bind \(hosts.path) /etc/hosts && exec \"$0\" \"$@\""])
        defer { relay.stop() }
        try relay.waitUntilListening()
        #expect(relay.output.contains("two.sameport.test:\(upstream.endpoint.port) (\(refused), \(upstream.endpoint))"))
        let client = try TestSocket.connect(to: Endpoint(.loopbackV4, port))
        try client.sendAll(Array("hello\n".utf8))
        #expect(try client.receive(exactly: 6, timeout: .seconds(5)).bytes == Array("hello\n".utf8))
        client.close()
        #expect(upstream.peers == [Endpoint(.loopbackV4, port)])
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("upstream", in: line) == upstream.endpoint.description)
        #expect(field("end", in: line) == "completed")
    }

    @Test("A reset from the upstream reaches the client as a reset")
    func upstreamReset() throws {
        let upstream = try TestServer { socket in
            _ = try? socket.receive(exactly: 4, timeout: .seconds(5))
            socket.reset()
        }
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description])
        defer { relay.stop() }
        let client = try TestSocket.connect(to: listen)
        try client.sendAll(Array("boom".utf8))
        #expect(try client.waitForEnd(timeout: .seconds(5)) == .reset)
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("end", in: line) == "upstream-reset")
    }

    @Test("A reset from the client reaches the upstream as a reset")
    func clientReset() throws {
        let seen = Mutex<TestSocket.End?>(nil)
        let upstream = try TestServer { socket in
            _ = try? socket.receive(exactly: 4, timeout: .seconds(5))
            let end = try? socket.waitForEnd(timeout: .seconds(5))
            seen.withLock { $0 = end }
        }
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description])
        defer { relay.stop() }
        let client = try TestSocket.connect(to: listen)
        try client.sendAll(Array("boom".utf8))
        #expect(waitUntil(timeout: .seconds(5)) { upstream.activeConnections == 1 })
        client.reset()
        #expect(waitUntil(timeout: .seconds(5)) { seen.withLock { $0 } != nil })
        #expect(seen.withLock { $0 } == .reset)
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("end", in: line) == "client-reset")
    }

    @Test("Idle timeout closes an idle pair and logs it; traffic keeps a pair open")
    func idleTimeout() throws {
        // Two upstreams, so that both clients are served at once from the one ip:P.
        let one = try TestServer(handler: TestServer.echo)
        defer { one.stop() }
        let two = try TestServer(handler: TestServer.echo)
        defer { two.stop() }
        let (relay, listen) = try startRelay(
            upstreams: [one.endpoint.description, two.endpoint.description], ["--idle-timeout", "600ms"])
        defer { relay.stop() }
        let busy = try TestSocket.connect(to: listen)
        let idle = try TestSocket.connect(to: listen)
        try idle.sendAll(Array("x".utf8))
        #expect(try idle.receive(exactly: 1, timeout: .seconds(5)).bytes == Array("x".utf8))
        let start = ContinuousClock.now
        // The busy one talks every 200 ms for 1.5 s: never idle for 600 ms.
        for _ in 0..<8 {
            try busy.sendAll(Array("y".utf8))
            #expect(try busy.receive(exactly: 1, timeout: .seconds(5)).bytes == Array("y".utf8))
            usleep(200_000)
        }
        #expect(try idle.waitForEnd(timeout: .seconds(3)) == .reset, "a stream cut by the idle timeout is reset, not ended")
        #expect(ContinuousClock.now - start < .seconds(3))
        try busy.sendAll(Array("z".utf8))
        #expect(try busy.receive(exactly: 1, timeout: .seconds(5)).bytes == Array("z".utf8))
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("end", in: line) == "idle-timeout")
        #expect(relay.lines(containing: "connection ended").count == 1)
    }
}
