import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// A configuration file in a directory of its own, removed by `remove()`.
private struct ConfigFixture {
    let directory: URL
    let path: String

    init(_ text: String, name: String = "sameport.toml") throws {
        directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("sameport-config-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        path = directory.appendingPathComponent(name).path
        try text.write(toFile: path, atomically: true, encoding: .utf8)
    }

    func remove() {
        try? FileManager.default.removeItem(at: directory)
    }
}

/// The package's Config/ directory.
private let configDirectory: URL = {
    URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Config")
}()

/// Runs sameport to completion: its exit status and output.
private func runToExit(_ arguments: [String]) throws -> (status: Int32?, output: String) {
    let process = try RelayProcess(arguments)
    let status = process.waitForExit(timeout: .seconds(20))
    if status == nil { process.stop(signal: SIGKILL) }
    return (status, process.output)
}

/// Starts `sameport run --config` on `text` and waits for each relay's "listening on" line.
private func startConfigured(_ text: String, relays: Int) throws -> (relay: RelayProcess, config: ConfigFixture) {
    let config = try ConfigFixture(text)
    do {
        let relay = try RelayProcess(["run", "--config", config.path])
        do {
            try relay.waitForLines(containing: "listening on", count: relays)
        } catch {
            relay.stop()
            throw error
        }
        return (relay, config)
    } catch {
        config.remove()
        throw error
    }
}

/// Connects from `source` (if given), exchanges a line, and checks the echo.
private func echo(through relay: Endpoint, from source: Endpoint? = nil, _ text: String = "ping\n") throws {
    let client = try TestSocket.connect(to: relay, from: source)
    defer { client.close() }
    try client.sendAll(Array(text.utf8))
    let reply = try client.receive(exactly: text.utf8.count, timeout: .seconds(5))
    #expect(reply.bytes == Array(text.utf8))
}

/// Connects as a client the relay should refuse, says something, and reads to the end. The reset
/// may come while connect() is still completing: that counts as the reset it is.
private func refusedClient(to target: Endpoint, from source: Endpoint?) throws -> (bytes: [UInt8], end: TestSocket.End) {
    let client: TestSocket
    do {
        client = try TestSocket.connect(to: target, from: source)
    } catch TestError.system(_, ECONNRESET) {
        return ([], .reset)
    }
    defer { client.close() }
    // The relay may reset the client before it sends: then send reports the reset (and a read
    // after it would only see the end).
    do {
        try client.sendAll(Array("let me in\n".utf8))
    } catch TestError.system(_, ECONNRESET) {
        return ([], .reset)
    }
    return try client.receiveToEnd(timeout: .seconds(5))
}

@Suite("Configuration file", .serialized)
struct ConfigFileTests {
    @Test("sameport check accepts every file in Config/ and prints its relays")
    func examplesPassCheck() throws {
        let files = try FileManager.default.contentsOfDirectory(atPath: configDirectory.path)
            .filter { $0.hasSuffix(".toml") }.sorted()
        #expect(files.count >= 4, "Config/ holds \(files)")
        for file in files {
            let path = configDirectory.appendingPathComponent(file).path
            let (status, output) = try runToExit(["check", "--config", path])
            #expect(status == 0, "\(file): \(output)")
            let lines = output.split(separator: "\n")
            #expect(lines.first?.hasPrefix("NAME ") == true, "\(file): \(output)")
            #expect(lines.last?.hasSuffix(", configuration OK") == true, "\(file): \(output)")
        }
        let (_, output) = try runToExit(["check", "--config", configDirectory.appendingPathComponent("socket-activated.toml").path])
        let row = output.split(separator: "\n").dropFirst().first.map { $0.split(separator: " ").map(String.init) }
        #expect(row == ["proxy", "127.0.0.1:7700", "127.0.0.1:9700", "same-port", "queue", "5s", "1h", "1m+10sx6", "30s", "1024", "any", "128", "131072", "on/1048576", "any", "off"])
    }

    @Test("The example shapes relay bytes from the fixed source port: one partner, a pool of upstreams, a wildcard")
    func exampleShapesRelay() throws {
        let partner = try TestServer(handler: TestServer.echo)
        defer { partner.stop() }
        let pool = try (0..<4).map { _ in try TestServer(Endpoint(.loopbackV6, 0), handler: TestServer.hold) }
        defer { pool.forEach { $0.stop() } }
        let backend = try TestServer(handler: TestServer.echo)
        defer { backend.stop() }
        let partnerPort = try freePort(), poolPort = try freePort(.loopbackV6), proxyPort = try freePort()
        let (relay, config) = try startConfigured("""
            [defaults]
            connect_timeout = "3s"
            idle_timeout = "1m"

            [[relay]]
            name = "partner"
            listen = "127.0.0.1:\(partnerPort)"
            upstream = "\(partner.endpoint)"
            allow = ["127.0.0.0/8"]

            [[relay]]
            name = "pool"
            listen = "[::1]:\(poolPort)"
            upstream = [\(pool.map { "\"\($0.endpoint)\"" }.joined(separator: ", "))]
            on_busy = "reject"

            [[relay]]
            name = "proxy"
            listen = "*:\(proxyPort)"
            upstream = "\(backend.endpoint)"
            """, relays: 3)
        defer { relay.stop(); config.remove() }

        let partnerListen = Endpoint(.loopbackV4, partnerPort)
        try echo(through: partnerListen)
        #expect(partner.peers == [partnerListen])

        // Four clients at once, one per upstream port, all from [::1]:poolPort; a fifth is refused.
        let poolListen = Endpoint(.loopbackV6, poolPort)
        let clients = try (0..<4).map { _ in try TestSocket.connect(to: poolListen) }
        defer { clients.forEach { $0.close() } }
        #expect(waitUntil(timeout: .seconds(5)) { pool.allSatisfy { $0.peers.count == 1 } })
        #expect(pool.flatMap(\.peers) == Array(repeating: poolListen, count: 4))
        #expect(try endOfTurnedAway(poolListen) == .reset)
        let rejected = try relay.waitForLines(containing: "end=busy-rejected")
        #expect(field("relay", in: rejected[0]) == "pool")

        // The wildcard relay dials from whichever address the client reached.
        let reached = Endpoint(IPAddress("127.0.0.2") ?? .loopbackV4, proxyPort)
        try echo(through: reached)
        #expect(backend.peers == [reached])

        let ended = try relay.waitForLines(containing: "end=completed", count: 2)
        #expect(Set(ended.compactMap { field("relay", in: $0) }) == ["partner", "proxy"])
    }

    @Test("allow/deny: real clients from 127.0.0.2, 127.0.0.3 and ::1; deny wins; the refused are reset and logged")
    func allowDeny() throws {
        let upstream = try TestServer(Endpoint(.anyV6, 0), dualStack: true, handler: TestServer.echo)
        defer { upstream.stop() }
        let openPort = try freePort(.anyV6), strictPort = try freePort(.anyV6)
        let (relay, config) = try startConfigured("""
            [defaults]
            upstream = ["127.0.0.1:\(upstream.endpoint.port)", "[::1]:\(upstream.endpoint.port)"]

            [[relay]]
            name = "open"
            listen = "*:\(openPort)"
            allow = ["127.0.0.0/8", "::1"]
            deny = ["127.0.0.3"]

            [[relay]]
            name = "strict"
            listen = "*:\(strictPort)"
            allow = "127.0.0.2/32"
            """, relays: 2)
        defer { relay.stop(); config.remove() }
        let two = IPAddress("127.0.0.2") ?? .loopbackV4, three = IPAddress("127.0.0.3") ?? .loopbackV4

        // Served: 127.0.0.2 and ::1 on "open", 127.0.0.2 on "strict".
        try echo(through: Endpoint(.loopbackV4, openPort), from: Endpoint(two, 0))
        try echo(through: Endpoint(.loopbackV6, openPort))
        try echo(through: Endpoint(.loopbackV4, strictPort), from: Endpoint(two, 0))
        #expect(waitUntil(timeout: .seconds(5)) { upstream.peers.count == 3 })

        // Refused: 127.0.0.3 on "open" (deny wins over the allowed 127.0.0.0/8), ::1 on "strict".
        for (target, source) in [(Endpoint(.loopbackV4, openPort), Endpoint(three, 0) as Endpoint?),
                                 (Endpoint(.loopbackV6, strictPort), nil)] {
            let (bytes, end) = try refusedClient(to: target, from: source)
            #expect(bytes.isEmpty)
            #expect(end == .reset, "refused client to \(target) saw \(end)")
        }
        let refused = try relay.waitForLines(containing: "end=refused", count: 2)
        #expect(refused.count == 2)
        #expect(field("relay", in: refused[0]) == "open")
        #expect(field("client", in: refused[0])?.hasPrefix("127.0.0.3:") == true)
        #expect(refused[0].contains("cause=\"the client is in deny 127.0.0.3/32\""))
        #expect(field("relay", in: refused[1]) == "strict")
        #expect(field("client", in: refused[1])?.hasPrefix("[::1]:") == true)
        #expect(refused[1].contains("cause=\"the client is in no allow block (127.0.0.2/32)\""))
        // The upstream never saw the refused clients.
        #expect(upstream.peers.count == 3)
    }

    @Test("--allow and --deny work on the command line too")
    func allowDenyFlags() throws {
        let (upstream, relay, listen) = try startEchoRelay(["--allow", "127.0.0.0/8", "--deny", "127.0.0.3/32"])
        defer { relay.stop(); upstream.stop() }
        try echo(through: listen, from: Endpoint(IPAddress("127.0.0.2") ?? .loopbackV4, 0))
        #expect(try refusedClient(to: listen, from: Endpoint(IPAddress("127.0.0.3") ?? .loopbackV4, 0)).end == .reset)
        let line = try relay.waitForLines(containing: "end=refused")[0]
        #expect(line.contains("cause=\"the client is in deny 127.0.0.3/32\""))
        #expect(upstream.peers.count == 1)
    }

    @Test("Nothing is half-started: every relay that cannot bind is named, the others are released, exit 2")
    func allOrNothing() throws {
        let holderB = try TestServer(handler: TestServer.hold)
        let holderC = try TestServer(handler: TestServer.hold)
        defer { holderB.stop(); holderC.stop() }
        let freeA = try freePort(), freeD = try freePort()
        let config = try ConfigFixture("""
            [defaults]
            upstream = "127.0.0.1:9"

            [[relay]]
            name = "a"
            listen = "127.0.0.1:\(freeA)"

            [[relay]]
            name = "b"
            listen = "\(holderB.endpoint)"

            [[relay]]
            name = "c"
            listen = "\(holderC.endpoint)"

            [[relay]]
            name = "d"
            listen = "127.0.0.1:\(freeD)"
            egress = "\(holderB.endpoint)"
            """)
        defer { config.remove() }
        let (status, output) = try runToExit(["--config", config.path])
        #expect(status == 2)
        #expect(output == """
            sameport: cannot start: relay b: cannot listen on \(holderB.endpoint): Address already in use: another socket holds port \(holderB.endpoint.port) (a listener, or a connection using it as its local port: ss -tanp 'sport = :\(holderB.endpoint.port)' shows which); stop its process or choose another listen port
            sameport: cannot start: relay c: cannot listen on \(holderC.endpoint): Address already in use: another socket holds port \(holderC.endpoint.port) (a listener, or a connection using it as its local port: ss -tanp 'sport = :\(holderC.endpoint.port)' shows which); stop its process or choose another listen port
            sameport: cannot start: relay d: the egress cannot bind \(holderB.endpoint): Address already in use: another socket holds this address without SO_REUSEPORT, or belongs to another user

            """)
        // Relay a was bound and then released: its port can be bound again.
        for port in [freeA, freeD] {
            let probe = try TestSocket.tcp(ipv6: false)
            #expect(throws: Never.self) { try probe.bind(Endpoint(.loopbackV4, port)) }
            probe.close()
        }
    }

    @Test("A bad file: every problem as FILE:LINE:COLUMN, a summary, exit 2, from run and from check")
    func badFile() throws {
        let config = try ConfigFixture("""
            [[relay]]
            name = "a"
            listen = "127.0.0.1:7000"
            upstream = "127.0.0.1:9000"
            max_conections = 10

            [[relay]]
            name = "a"
            listen = "127.0.0.1:7000"
            upstream = "127.0.0.1:9000"
            """)
        defer { config.remove() }
        let expected = """
            \(config.path):5:1: unknown key 'max_conections' in [[relay]]; did you mean 'max_connections'?
            \(config.path):8:1: duplicate relay name 'a': relay #1 (line 1) already has it; give each relay its own name
            \(config.path):9:1: relay 'a' listens on 127.0.0.1:7000, as relay 'a' (line 1) does; give each relay its own address or port
            sameport: configuration error: 3 problems in \(config.path); fix them and run 'sameport check --config \(config.path)'

            """
        for command in [["run", "--config", config.path], ["check", "--config", config.path]] {
            let (status, output) = try runToExit(command)
            #expect(status == 2, "\(command)")
            #expect(output == expected, "\(command)")
        }
        let (status, output) = try runToExit(["check", "--config", config.directory.appendingPathComponent("missing.toml").path])
        #expect(status == 2)
        #expect(output == "sameport: configuration error: cannot read \(config.directory.appendingPathComponent("missing.toml").path): No such file or directory (errno 2); check the path\n")
    }

    /// The shards' epoll sets: one per event loop, plus libdispatch's own.
    private static func epollSets(_ relay: RelayProcess) -> Int {
        relay.openFileDescriptors(linkingTo: ["anon_inode:[eventpoll]"])
    }

    @Test("Two relays that dial one upstream from one egress ip:port are named at start-up: their bookings are separate")
    func sharedEgressPair() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let egress = try freePort(), otherEgress = try freePort()
        let relay = { (name: String, egress: UInt16) throws -> String in
            "[[relay]]\nname = \"\(name)\"\nlisten = \"127.0.0.1:\(try freePort())\"\nupstream = \"\(upstream.endpoint)\"\negress = \"127.0.0.1:\(egress)\"\n\n"
        }
        // a and b share 127.0.0.1:egress; c dials the same upstream from another port.
        let (process, config) = try startConfigured(try relay("a", egress) + relay("b", egress) + relay("c", otherEgress), relays: 3)
        defer { process.stop(); config.remove() }
        let lines = process.lines(containing: "books that pair for itself")
        #expect(lines.count == 1, "\(lines)")
        #expect(lines.first?.contains("warning relays a and b both dial \(upstream.endpoint) from 127.0.0.1:\(egress), and each books that pair for itself: while one holds it, a client of the other fails to connect (EADDRNOTAVAIL) until it is free or the connect timeout passes; give the two relays different egress ports or different upstreams") == true, "\(lines)")
    }

    @Test("threads: the file's top-level key and --threads set the event loops (--threads wins); out of range is refused")
    func threads() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let listen = Endpoint(.loopbackV4, try freePort())
        let text = """
            threads = 1

            [[relay]]
            name = "one"
            listen = "\(listen)"
            upstream = "\(upstream.endpoint)"

            """
        do {
            let (relay, config) = try startConfigured(text, relays: 1)
            defer { relay.stop(); config.remove() }
            try echo(through: listen)
            #expect(Self.epollSets(relay) == 2, "one shard and libdispatch's: \(Self.epollSets(relay))")
            let (status, output) = try runToExit(["check", config.path])
            #expect(status == 0)
            #expect(output.contains("threads: 1 event loop\n"), "\(output)")
            // A reload cannot change the event loops: a changed key is said once, not ignored.
            try text.replacingOccurrences(of: "threads = 1", with: "threads = 2").write(toFile: config.path, atomically: true, encoding: .utf8)
            kill(relay.pid, SIGHUP)
            let changed = try relay.waitForLines(containing: "changed threads = 1 to threads = 2")
            #expect(changed.first?.hasSuffix("\(config.path) changed threads = 1 to threads = 2: event loops are made at start-up (1 running), so restart sameport to apply it (--threads on the command line, if given, overrides the key)") == true, "\(changed)")
            kill(relay.pid, SIGHUP)
            try relay.waitForLines(containing: "reloaded", count: 2)
            #expect(relay.lines(containing: "to threads = 2").count == 1, "said once per change")
            #expect(Self.epollSets(relay) == 2, "still one shard")
            try echo(through: listen)
        }
        do {
            let config = try ConfigFixture(text)
            defer { config.remove() }
            let relay = try RelayProcess(["run", "--config", config.path, "--threads", "3"])
            defer { relay.stop() }
            try relay.waitForLines(containing: "listening on")
            try echo(through: listen)
            #expect(Self.epollSets(relay) == 4, "three shards and libdispatch's: \(Self.epollSets(relay))")
        }
        do {
            let config = try ConfigFixture(text.replacingOccurrences(of: "threads = 1", with: "threads = 0"))
            defer { config.remove() }
            let (status, output) = try runToExit(["check", config.path])
            #expect(status == 2)
            #expect(output.contains("\(config.path):1:1: 'threads' must be a whole number from 1 to 256: the event loops that accept and relay (leave it out for one per CPU)"), "\(output)")
        }
        let (status, output) = try runToExit(["--listen", listen.description, "--upstream", upstream.endpoint.description, "--threads", "300"])
        #expect(status == 2)
        #expect(output.contains("invalid --threads 300: give a number of event loops from 1 to 256"), "\(output)")
    }
}
