import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// The 4-tuple rule: from one ip:P only one connection to a given upstream ip:port can exist.
///
///   client A ──▶ relay ip:P ══(ip:P)══▶ upstream U   (A holds the only pair to U)
///   client B ──▶ relay ip:P ── ? ──────▶ upstream U   (on-busy decides)
@Suite("Busy upstream policies", .serialized)
struct BusyPolicyTests {
    /// Connects a client, exchanges one line through the relay, and keeps the connection open.
    private func openEchoed(_ listen: Endpoint, _ text: String) throws -> TestSocket {
        let client = try TestSocket.connect(to: listen)
        try client.sendAll(Array(text.utf8))
        let reply = try client.receive(exactly: text.utf8.count, timeout: .seconds(10))
        #expect(reply.bytes == Array(text.utf8), "echo of \(text)")
        return client
    }

    @Test("queue: the second client waits for the pair, then is served from the same ip:P")
    func queue() throws {
        let (upstream, relay, listen) = try startEchoRelay(["--connect-timeout", "10s"])
        defer { relay.stop(); upstream.stop() }
        let first = try openEchoed(listen, "first\n")
        let second = try TestSocket.connect(to: listen)
        try second.sendAll(Array("second\n".utf8))
        // While the first holds the only pair, the second gets nothing and the upstream sees nobody new.
        let early = try second.receive(exactly: 7, timeout: .milliseconds(500))
        #expect(early.end == .timeout && early.bytes.isEmpty)
        #expect(upstream.peers.count == 1)
        first.close()
        let late = try second.receive(exactly: 7, timeout: .seconds(10))
        #expect(late.bytes == Array("second\n".utf8))
        #expect(upstream.peers == [listen, listen])
        second.close()
        let lines = try relay.waitForLines(containing: "connection ended", count: 2)
        #expect(lines.allSatisfy { field("end", in: $0) == "completed" })
    }

    @Test("queue: a client waits no longer than the connect timeout, and the queue is bounded; both are reset")
    func queueLimits() throws {
        let (upstream, relay, listen) = try startEchoRelay(["--connect-timeout", "600ms", "--queue-limit", "1"])
        defer { relay.stop(); upstream.stop() }
        let first = try openEchoed(listen, "first\n")
        defer { first.close() }
        let waiting = try TestSocket.connect(to: listen)
        #expect(try endOfTurnedAway(listen, timeout: .seconds(2)) == .reset, "queue-full is a failure: reset, not FIN")
        let start = ContinuousClock.now
        #expect(try waiting.waitForEnd(timeout: .seconds(3)) == .reset, "queue-timeout is a failure: reset, not FIN")
        #expect(ContinuousClock.now - start < .seconds(2))
        let lines = try relay.waitForLines(containing: "connection ended", count: 2)
        #expect(lines.contains { field("end", in: $0) == "queue-full" })
        #expect(lines.contains { field("end", in: $0) == "queue-timeout" })
    }

    @Test("reject: the second client is reset at once and the reason logged")
    func reject() throws {
        let (upstream, relay, listen) = try startEchoRelay(["--on-busy", "reject"])
        defer { relay.stop(); upstream.stop() }
        let first = try openEchoed(listen, "first\n")
        defer { first.close() }
        let start = ContinuousClock.now
        #expect(try endOfTurnedAway(listen) == .reset, "busy-rejected is a failure: reset, not FIN")
        #expect(ContinuousClock.now - start < .seconds(1))
        let line = try relay.waitForLines(containing: "end=busy-rejected")[0]
        #expect(line.contains("every upstream is in use"))
        #expect(upstream.peers.count == 1)
    }

    @Test("ephemeral: the second client is served from another port, and that is logged")
    func ephemeral() throws {
        let (upstream, relay, listen) = try startEchoRelay(["--on-busy", "ephemeral"])
        defer { relay.stop(); upstream.stop() }
        let first = try openEchoed(listen, "first\n")
        let second = try openEchoed(listen, "second\n")
        first.close()
        second.close()
        let peers = upstream.peers
        #expect(peers.count == 2)
        #expect(peers.first == listen)
        #expect(peers.last?.address == listen.address)
        #expect(peers.last?.port != listen.port)
        #expect(try relay.waitForLines(containing: "ephemeral port").count == 1)
    }

    @Test("two upstreams: two clients run at once, both from the same ip:P")
    func twoUpstreams() throws {
        let one = try TestServer(handler: TestServer.echo)
        defer { one.stop() }
        let two = try TestServer(handler: TestServer.echo)
        defer { two.stop() }
        let (relay, listen) = try startRelay(upstreams: [one.endpoint.description, two.endpoint.description])
        defer { relay.stop() }
        let first = try openEchoed(listen, "first\n")
        let second = try openEchoed(listen, "second\n")
        #expect(one.peers == [listen])
        #expect(two.peers == [listen])
        first.close()
        second.close()
    }

    @Test("ephemeral fallback keeps the IP of --egress IP:PORT")
    func ephemeralKeepsFixedEgressIP() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let egress = Endpoint(IPAddress("127.0.0.3")!, try freePort())
        let (relay, listen) = try startRelay(
            upstreams: [upstream.endpoint.description], ["--egress", egress.description, "--on-busy", "ephemeral"])
        defer { relay.stop() }
        let first = try openEchoed(listen, "first\n")
        let second = try openEchoed(listen, "second\n")
        first.close()
        second.close()
        #expect(upstream.peers.first == egress)
        #expect(upstream.peers.last?.address == egress.address)
        #expect(upstream.peers.last?.port != egress.port)
    }

    @Test("queue: a client that resets while queued is dropped, not dialled")
    func queuedClientResets() throws {
        let (upstream, relay, listen) = try startEchoRelay(["--connect-timeout", "10s"])
        defer { relay.stop(); upstream.stop() }
        let first = try openEchoed(listen, "first\n")
        let quitter = try TestSocket.connect(to: listen)
        quitter.reset()
        first.close()
        let line = try relay.waitForLines(containing: "end=client-reset")[0]
        #expect(field("upstream", in: line) == "-")
        let third = try openEchoed(listen, "third\n")
        third.close()
        #expect(upstream.peers.count == 2, "the upstream saw \(upstream.peers.count) connections")
    }

    @Test("queue: a client that sent bytes and resets while queued leaves the queue at once; its bytes never reach the upstream and its place goes to the next client")
    func queuedClientWithBytesResets() throws {
        let (upstream, relay, listen) = try startEchoRelay(["--connect-timeout", "10s", "--queue-limit", "1"])
        defer { relay.stop(); upstream.stop() }
        let first = try openEchoed(listen, "first\n")
        let quitter = try TestSocket.connect(to: listen)
        try quitter.sendAll(Array("DELETE /account/42\n".utf8))
        // Queued (the one pair is held): nothing comes back.
        #expect(try quitter.receive(exactly: 1, timeout: .milliseconds(300)).end == .timeout)
        quitter.reset()
        // Dropped while the first still holds the pair, not when its turn comes.
        let line = try relay.waitForLines(containing: "end=client-reset", timeout: .seconds(5))[0]
        #expect(field("upstream", in: line) == "-")
        // Its place in the queue (limit 1) is free: the next client waits there instead of being
        // turned away as queue-full, and is served once the first leaves.
        let next = try TestSocket.connect(to: listen)
        try next.sendAll(Array("next\n".utf8))
        #expect(try next.receive(exactly: 5, timeout: .milliseconds(300)).end == .timeout, "queued, not reset")
        first.close()
        #expect(try next.receive(exactly: 5, timeout: .seconds(10)).bytes == Array("next\n".utf8))
        next.close()
        #expect(upstream.peers.count == 2, "the upstream saw \(upstream.peers.count) connections: the reset client was dialled")
        #expect(relay.lines(containing: "queue-full").isEmpty)
    }

    @Test("failover: an upstream that refuses is passed over for the next free one")
    func failover() throws {
        let live = try TestServer(handler: TestServer.echo)
        defer { live.stop() }
        let dead = Endpoint(.loopbackV4, try freePort())
        let (relay, listen) = try startRelay(upstreams: [dead.description, live.endpoint.description])
        defer { relay.stop() }
        for index in 0..<6 {
            let client = try openEchoed(listen, "client \(index)\n")
            client.close()
            try relay.waitForLines(containing: "connection ended", count: index + 1)
        }
        let lines = relay.lines(containing: "connection ended")
        #expect(lines.allSatisfy { field("end", in: $0) == "completed" && field("upstream", in: $0) == live.endpoint.description })
        #expect(live.peers == Array(repeating: listen, count: 6))
        // The warning says why the upstream was passed over.
        let warning = try #require(relay.lines(containing: "failed to connect: passed over").first)
        #expect(warning.hasSuffix("cause=\"\(dead): connect: Connection refused (errno 111)\""), "\(warning)")
    }

    /// Two upstreams, both busy; one then stops listening. A third client is handed that one,
    /// is refused, and must wait for the other to free up rather than fail at once.
    @Test("failover waits for a busy upstream instead of failing at once")
    func failoverWaitsForBusyUpstream() throws {
        let one = try TestServer(handler: TestServer.echo)
        defer { one.stop() }
        let two = try TestServer(handler: TestServer.echo)
        defer { two.stop() }
        let (relay, listen) = try startRelay(
            upstreams: [one.endpoint.description, two.endpoint.description], ["--connect-timeout", "10s"])
        defer { relay.stop() }
        let first = try openEchoed(listen, "first\n")
        let second = try openEchoed(listen, "second\n")
        one.stop()  // refuses from now on
        let onFirst = one.peers.count == 1
        (onFirst ? first : second).close()
        try relay.waitForLines(containing: "connection ended")
        let third = try TestSocket.connect(to: listen)
        try third.sendAll(Array("third\n".utf8))
        try relay.waitForLines(containing: "failed to connect: passed over")
        #expect(relay.lines(containing: "connection ended").count == 1, "the third client failed instead of waiting")
        (onFirst ? second : first).close()
        #expect(try third.receive(exactly: 6, timeout: .seconds(10)).bytes == Array("third\n".utf8))
        third.close()
        let lines = try relay.waitForLines(containing: "connection ended", count: 3)
        #expect(lines.allSatisfy { field("end", in: $0) == "completed" }, "\(lines)")
    }
}
