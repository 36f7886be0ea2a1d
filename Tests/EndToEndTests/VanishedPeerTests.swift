import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// The relay's established sockets on `port` as `ss` shows them, one line each, with their timers
/// (`timer:(keepalive,…)`).
private func establishedSockets(port: UInt16) throws -> [String] {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/ss")
    process.arguments = ["-tnoH", "state", "established", "( sport = :\(port) )"]
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = FileHandle.nullDevice
    try process.run()
    let output = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return String(decoding: output, as: UTF8.self).split(separator: "\n").map(String.init)
}

/// Sends `text` and expects it back.
private func echoed(_ socket: TestSocket, _ text: String, timeout: Duration = .seconds(5)) throws -> Bool {
    try socket.sendAll(Array(text.utf8))
    return try socket.receive(exactly: text.utf8.count, timeout: timeout).bytes == Array(text.utf8)
}

/// A peer that vanishes (its packets dropped by nftables) and a client address that would take
/// every pair: keepalive, TCP_USER_TIMEOUT and max_per_client.
@Suite("Vanished peers and greedy clients", .serialized)
struct VanishedPeerTests {
    @Test("keepalive is on by default on both of a connection's sockets, and --keepalive 0 turns it off")
    func keepaliveDefault() throws {
        for flags in [[], ["--keepalive", "0", "--user-timeout", "0"]] {
            let (upstream, relay, listen) = try startEchoRelay(flags)
            defer { relay.stop(); upstream.stop() }
            let client = try TestSocket.connect(to: listen)
            defer { client.close() }
            #expect(try echoed(client, "ping\n"))
            // The upstream socket gets its keepalive once the connection has relayed a second:
            // look after that.
            usleep(1_500_000)
            // Same-port: both of the relay's sockets are on the listen port (client side and egress).
            let sockets = try establishedSockets(port: listen.port)
            #expect(sockets.count == 2, "\(sockets)")
            let probing = sockets.filter { $0.contains("timer:(keepalive") }
            #expect(probing.count == (flags.isEmpty ? 2 : 0), "\(flags): \(sockets)")
        }
    }

    @Test("keepalive comes to clients from the listener: a reload that turns it on applies to the clients accepted after it")
    func keepaliveFollowsReload() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let listen = Endpoint(.loopbackV4, try freePort())
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("sameport-keepalive-reload-\(getpid()).toml").path
        let text = { (keepalive: String) in
            "[[relay]]\nname = \"k\"\nlisten = \"\(listen)\"\nupstream = \"\(upstream.endpoint)\"\negress = \"ephemeral\"\nkeepalive = \"\(keepalive)\"\nuser_timeout = \"0\"\n"
        }
        try text("0").write(toFile: path, atomically: true, encoding: .utf8)
        defer { unlink(path) }
        let relay = try RelayProcess(["run", "--config", path])
        defer { relay.stop() }
        try relay.waitUntilListening()
        let before = try TestSocket.connect(to: listen)
        defer { before.close() }
        #expect(try echoed(before, "off\n"))
        let clientSide = { (client: TestSocket) throws -> String? in
            let port = client.localEndpoint?.port ?? 0
            return try establishedSockets(port: listen.port).first { $0.contains("127.0.0.1:\(port)") }
        }
        #expect(try clientSide(before)?.contains("timer:(keepalive") == false)
        try text("45s").write(toFile: path, atomically: true, encoding: .utf8)
        kill(relay.pid, SIGHUP)
        _ = try relay.waitForLines(containing: "reloaded")
        let after = try TestSocket.connect(to: listen)
        defer { after.close() }
        #expect(try echoed(after, "on\n"))
        let sockets = try establishedSockets(port: listen.port)
        #expect(try clientSide(after)?.contains("timer:(keepalive") == true, "\(sockets)")
        #expect(try clientSide(before)?.contains("timer:(keepalive") == false, "an open connection keeps its settings")
    }

    /// In a namespace of the test's own, one upstream, so the first client holds the only pair:
    ///
    ///   client 127.0.0.2 ──▶ relay 127.0.0.1:7000 ══▶ upstream 127.0.0.1:9000
    ///   client 127.0.0.3 ──▶ (queued)
    ///
    /// Then nftables drops everything to and from the vanished side. Keepalive (1s + 1s x 2) must
    /// end that connection within about 3 s, so that the queued client is served long before its
    /// 20 s connect timeout.
    @Test("A vanished peer frees its pair within the keepalive bound", arguments: ["client", "upstream"])
    func vanished(side: String) throws {
        _ = ignoreSIGPIPE
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        let upstream = try namespace.withThread { try TestServer(Endpoint(.loopbackV4, 9000), handler: TestServer.echo) }
        defer { upstream.stop() }
        let relay = try RelayProcess(
            ["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9000", "--connect-timeout", "20s",
             "--keepalive", "1s", "--keepalive-interval", "1s", "--keepalive-count", "2"],
            prefix: namespace.prefix)
        defer { relay.stop() }
        try relay.waitUntilListening()
        let listen = Endpoint(.loopbackV4, 7000)
        let vanishing = try namespace.withThread {
            try TestSocket.connect(to: listen, from: Endpoint(IPAddress("127.0.0.2") ?? .loopbackV4, 0))
        }
        defer { vanishing.close() }
        #expect(try echoed(vanishing, "one\n"))
        let drop = side == "client"
            ? "add rule inet vanish input ip saddr 127.0.0.2 drop; add rule inet vanish input ip daddr 127.0.0.2 drop"
            : "add rule inet vanish input tcp sport 9000 drop; add rule inet vanish input tcp dport 9000 drop"
        try namespace.run(["nft", "add table inet vanish; add chain inet vanish input { type filter hook input priority 0; policy accept; }; " + drop])
        let start = ContinuousClock.now
        if side == "client" {
            let next = try namespace.withThread {
                try TestSocket.connect(to: listen, from: Endpoint(IPAddress("127.0.0.3") ?? .loopbackV4, 0))
            }
            defer { next.close() }
            #expect(try echoed(next, "two\n", timeout: .seconds(12)), "the queued client was not served")
        } else {
            #expect(try vanishing.waitForEnd(timeout: .seconds(12)) == .reset)
        }
        let elapsed = ContinuousClock.now - start
        #expect(elapsed >= .seconds(2) && elapsed < .seconds(8), "freed after \(elapsed)")
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("client", in: line)?.hasPrefix("127.0.0.2:") == true, "\(line)")
        #expect(field("end", in: line) == "error")
        // recv or splice, whichever path the direction was on.
        #expect(line.contains("cause=\"\(side): ") && line.contains(": Connection timed out (errno 110)\""), "\(line)")
    }

    ///   client 127.0.0.2 ──▶ relay ══▶ upstream one   (holds one pair)
    ///   client 127.0.0.2 ──▶ relay  ✗                 (max_per_client 1: reset)
    ///   client 127.0.0.3 ──▶ relay ══▶ upstream two
    @Test("max_per_client: one address past the limit is reset and logged; others are served; a freed slot is reused")
    func maxPerClient() throws {
        let one = try TestServer(handler: TestServer.echo)
        defer { one.stop() }
        let two = try TestServer(handler: TestServer.echo)
        defer { two.stop() }
        let (relay, listen) = try startRelay(
            upstreams: [one.endpoint.description, two.endpoint.description], ["--max-per-client", "1"])
        defer { relay.stop() }
        let greedy = Endpoint(IPAddress("127.0.0.2") ?? .loopbackV4, 0)
        let other = Endpoint(IPAddress("127.0.0.3") ?? .loopbackV4, 0)
        let first = try TestSocket.connect(to: listen, from: greedy)
        #expect(try echoed(first, "first\n"))
        #expect(try endOfTurnedAway(listen, from: greedy) == .reset)
        let line = try relay.waitForLines(containing: "end=client-limit")[0]
        #expect(field("client", in: line)?.hasPrefix("127.0.0.2:") == true)
        #expect(line.contains("this client address holds 1 connection already, the relay's max_per_client"), "\(line)")
        let third = try TestSocket.connect(to: listen, from: other)
        #expect(try echoed(third, "third\n"))
        third.close()
        first.close()
        try relay.waitForLines(containing: "end=completed", count: 2)
        let again = try TestSocket.connect(to: listen, from: greedy)
        defer { again.close() }
        #expect(try echoed(again, "again\n"))
        #expect(relay.lines(containing: "end=client-limit").count == 1)
    }

    @Test("check shows keepalive and max_per_client, and names a keepalive the kernel cannot take")
    func check() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("sameport-keepalive-\(getpid()).toml").path
        defer { unlink(path) }
        try """
            [[relay]]
            name = "quiet"
            listen = "127.0.0.1:7000"
            upstream = "127.0.0.1:9000"
            keepalive = "0"
            user_timeout = "90s"
            max_per_client = 4

            [[relay]]
            name = "probing"
            listen = "127.0.0.1:7001"
            upstream = "127.0.0.1:9000"
            keepalive = "30s"
            keepalive_interval = "5s"
            keepalive_count = 3
            """.write(toFile: path, atomically: true, encoding: .utf8)
        let process = try RelayProcess(["check", "--config", path])
        #expect(process.waitForExit(timeout: .seconds(10)) == 0, "\(process.output)")
        let rows = process.output.split(separator: "\n").map { $0.split(separator: " ").map(String.init) }
        #expect(rows.first?[7] == "KEEPALIVE" && rows.first?[10] == "PER-CLIENT", "\(process.output)")
        #expect(rows.dropFirst().first.map { [$0[7], $0[10]] } == ["off,user=90s", "4"], "\(process.output)")
        #expect(rows.dropFirst(2).first.map { [$0[7], $0[10]] } == ["30s+5sx3", "any"], "\(process.output)")

        try "[[relay]]\nlisten = \"127.0.0.1:7000\"\nupstream = \"127.0.0.1:9000\"\nkeepalive = \"1.5s\"\nkeepalive_count = 200\n"
            .write(toFile: path, atomically: true, encoding: .utf8)
        let bad = try RelayProcess(["check", "--config", path])
        #expect(bad.waitForExit(timeout: .seconds(10)) == 2)
        #expect(bad.output.hasPrefix("""
            \(path):4:13: the keepalive idle time must be whole seconds from 1s to 32767s (the kernel counts it in seconds; 0 turns keepalive off), not 1.5s
            \(path):5:19: the keepalive probe count must be from 1 to 127, not 200

            """), "\(bad.output)")
    }
}
