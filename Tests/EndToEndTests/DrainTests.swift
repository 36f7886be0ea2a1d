import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// A configuration file of the test's own, rewritten for reloads; removed by `remove()`.
private struct ReloadableConfig {
    let path = FileManager.default.temporaryDirectory
        .appendingPathComponent("sameport-drain-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).toml").path

    func write(_ text: String) throws {
        try text.write(toFile: path, atomically: true, encoding: .utf8)
    }

    func remove() {
        unlink(path)
    }
}

/// Connects, sends `text`, and expects it back; returns the open client.
private func echoClient(_ listen: Endpoint, _ text: String) throws -> TestSocket {
    let client = try TestSocket.connect(to: listen)
    try client.sendAll(Array(text.utf8))
    #expect(try client.receive(exactly: text.utf8.count, timeout: .seconds(5)).bytes == Array(text.utf8), "echo of \(text)")
    return client
}

/// Stopping and reloading while clients wait or connections drain.
@Suite("Drain", .serialized)
struct DrainTests {
    ///   client A ══▶ relay ══▶ upstream   (holds the only pair)
    ///   client B ──▶ relay (queued)        SIGTERM: B is served once A is done
    @Test("SIGTERM: a queued client is served during the drain window, not reset at once")
    func queuedServedDuringDrain() throws {
        let (upstream, relay, listen) = try startEchoRelay(
            ["--connect-timeout", "10s", "--drain-timeout", "10s", "--log-level", "debug"])
        defer { relay.stop(); upstream.stop() }
        let first = try echoClient(listen, "first\n")
        let queued = try TestSocket.connect(to: listen)
        defer { queued.close() }
        try queued.sendAll(Array("queued\n".utf8))
        try relay.waitForLines(containing: "queued: every upstream is in use")
        kill(relay.pid, SIGTERM)
        try relay.waitForLines(containing: "stopping on SIGTERM: draining 1 open connection and 1 queued client for up to 10s")
        try first.sendAll(Array("more\n".utf8))
        #expect(try first.receive(exactly: 5, timeout: .seconds(5)).bytes == Array("more\n".utf8))
        first.close()
        let (bytes, end) = try queued.receive(exactly: 7, timeout: .seconds(5))
        #expect(bytes == Array("queued\n".utf8), "the queued client got \(bytes.count) bytes, end \(String(describing: end))")
        queued.close()
        #expect(relay.waitForExit(timeout: .seconds(10)) == 0)
        let lines = relay.lines(containing: "connection ended")
        #expect(lines.count == 2 && lines.allSatisfy { field("end", in: $0) == "completed" }, "\(lines)")
        #expect(upstream.peers == [listen, listen])
    }

    @Test("SIGTERM: a queued client still waiting when the drain ends is reset")
    func queuedResetWhenDrainEnds() throws {
        let (upstream, relay, listen) = try startEchoRelay(
            ["--connect-timeout", "10s", "--drain-timeout", "500ms", "--log-level", "debug"])
        defer { relay.stop(); upstream.stop() }
        let first = try echoClient(listen, "first\n")
        defer { first.close() }
        let queued = try TestSocket.connect(to: listen)
        defer { queued.close() }
        try relay.waitForLines(containing: "queued: every upstream is in use")
        kill(relay.pid, SIGTERM)
        #expect(try queued.waitForEnd(timeout: .seconds(5)) == .reset)
        #expect(relay.waitForExit(timeout: .seconds(10)) == 0)
        #expect(relay.lines(containing: "end=shutdown").count == 2)
    }

    /// A relay moved to another port and back while its first self still drains a connection
    /// that holds (P, upstream one): the relay back on P must not dial that held pair for the
    /// whole connect timeout while upstream two is free.
    @Test("Port moved away and back during a drain: a new client gets the free upstream at once")
    func portMovedBackDuringDrain() throws {
        let one = try TestServer(handler: TestServer.echo)
        defer { one.stop() }
        let two = try TestServer(handler: TestServer.echo)
        defer { two.stop() }
        let port = try freePort()
        let other = try freePort()
        let listen = Endpoint(.loopbackV4, port)
        let config = ReloadableConfig()
        defer { config.remove() }
        let text = { (port: UInt16) in
            "[[relay]]\nname = \"pool\"\nlisten = \"127.0.0.1:\(port)\"\nupstream = [\"\(one.endpoint)\", \"\(two.endpoint)\"]\nconnect_timeout = \"5s\"\n"
        }
        try config.write(text(port))
        let relay = try RelayProcess(["run", "--config", config.path])
        defer { relay.stop() }
        try relay.waitUntilListening()
        let held = try echoClient(listen, "held\n")
        defer { held.close() }
        #expect(one.peers == [listen])
        try config.write(text(other))
        kill(relay.pid, SIGHUP)
        // A move, said as one: not "added: pool; removed: pool".
        try relay.waitForLines(containing: "reloaded \(config.path): 1 relay; added: none; removed: none; changed: none; unchanged: 0; moved: pool (127.0.0.1:\(port) to 127.0.0.1:\(other))")
        try config.write(text(port))
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reloaded", count: 2)
        let start = ContinuousClock.now
        let next = try echoClient(listen, "next\n")
        next.close()
        #expect(ContinuousClock.now - start < .seconds(2), "served after \(ContinuousClock.now - start)")
        #expect(two.peers == [listen])
        // The drained connection was not disturbed.
        try held.sendAll(Array("still\n".utf8))
        #expect(try held.receive(exactly: 6, timeout: .seconds(5)).bytes == Array("still\n".utf8))
    }

    @Test("SIGINT after reloads to a 255-character name and to a refused 10 MB one: a clean exit 0")
    func sigintAfterReloads() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let listen = Endpoint(.loopbackV4, try freePort())
        let config = ReloadableConfig()
        defer { config.remove() }
        let text = { (name: String) in "[[relay]]\nname = \"\(name)\"\nlisten = \"\(listen)\"\nupstream = \"\(upstream.endpoint)\"\n" }
        try config.write(text("first"))
        let relay = try RelayProcess(["run", "--config", config.path])
        defer { relay.stop() }
        try relay.waitUntilListening()
        try config.write(text(String(repeating: "n", count: 255)))
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reloaded")
        try config.write(text(String(repeating: "m", count: 10 << 20)))
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reload failed")
        try echoClient(listen, "ping\n").close()
        #expect(relay.stop(signal: SIGINT) == 0, "\(relay.output.suffix(2000))")
    }
}
