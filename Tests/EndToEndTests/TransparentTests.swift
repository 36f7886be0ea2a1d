import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// Transparent forwarding (`upstream = "original"`, `transparent`, `egress = "client"`), in
/// network namespaces each test builds and removes (`RoutedTopology`):
///
/// ```
///   client 10.0.1.2 ──▶ dials server:80 ──▶ router: nftables REDIRECT or TPROXY ──▶ sameport
///                                                          sameport ──▶ server 10.0.2.2:80
/// ```
/// The server records the source address of each connection it accepts: the router's own
/// address and sameport's port (egress same-port), or the client's own (egress client).
@Suite(
    "Transparent forwarding", .serialized,
    .enabled(if: RoutedTopology.isAvailable, "needs root, iproute2 and nftables (scripts/setup.sh)"))
struct TransparentTests {
    enum Family: CaseIterable, CustomStringConvertible {
        case ipv4, ipv6

        var client: IPAddress { self == .ipv4 ? RoutedTopology.clientV4 : RoutedTopology.clientV6 }
        var server: IPAddress { self == .ipv4 ? RoutedTopology.serverV4 : RoutedTopology.serverV6 }
        var routerServerSide: IPAddress { self == .ipv4 ? RoutedTopology.routerServerSideV4 : RoutedTopology.routerServerSideV6 }
        var routerClientSide: IPAddress { self == .ipv4 ? RoutedTopology.routerClientSideV4 : RoutedTopology.routerClientSideV6 }
        var description: String { self == .ipv4 ? "IPv4" : "IPv6" }
    }

    static let relayPort: UInt16 = 7000
    static let destinations = ["--destination", "10.0.2.0/24:80", "--destination", "[fd00:2::]/64:80"]

    /// A topology with an echo server on the server's port 80 (both families) and a relay in the
    /// router started with `arguments`; `body` runs with them, then everything is removed.
    private func withRelay(
        _ arguments: [String], listen: String = "*:\(TransparentTests.relayPort)", rules: (RoutedTopology) throws -> Void,
        _ body: (RoutedTopology, TestServer, TestServer, RelayProcess) throws -> Void
    ) throws {
        let topology = try RoutedTopology()
        defer { topology.remove() }
        try rules(topology)
        let servers = try topology.server.withThread {
            (try TestServer(Endpoint(RoutedTopology.serverV4, 80), handler: TestServer.echo),
             try TestServer(Endpoint(RoutedTopology.serverV6, 80), handler: TestServer.echo))
        }
        defer {
            servers.0.stop()
            servers.1.stop()
        }
        let relay = try RelayProcess(["--listen", listen, "--log-level", "debug"] + arguments, prefix: topology.router.prefix)
        defer { relay.stop() }
        try relay.waitUntilListening()
        let descriptors = relay.openFileDescriptors(linkingTo: ["socket:", "pipe:"])
        try body(topology, servers.0, servers.1, relay)
        // Every connection, served or refused, gave its sockets and pipes back.
        #expect(waitUntil(timeout: .seconds(10)) { relay.openFileDescriptors(linkingTo: ["socket:", "pipe:"]) == descriptors },
                "sockets and pipes: \(relay.openFileDescriptors(linkingTo: ["socket:", "pipe:"])) vs \(descriptors) before")
    }

    /// Connects from the client namespace to `destination`, sends bytes and checks they come
    /// back; returns the client's own address.
    private func echoThrough(_ topology: RoutedTopology, to destination: Endpoint, seed: UInt64) throws -> Endpoint {
        let client = try topology.client.withThread { try TestSocket.connect(to: destination) }
        defer { client.close() }
        let bytes = pattern(count: 100_000, seed: seed)
        try client.sendAll(bytes)
        client.shutdownWrite()
        let received = try client.receiveToEnd()
        #expect(received.end == .eof)
        #expect(received.bytes == bytes, "the bytes came back changed or cut (\(received.bytes.count) of \(bytes.count))")
        return try #require(client.localEndpoint)
    }

    @Test("REDIRECT: the client reaches the address it dialled, from the router's address and sameport's port", arguments: Family.allCases)
    func redirect(family: Family) throws {
        try withRelay(["--upstream", "original"] + Self.destinations, rules: { try $0.redirect(port: 80, to: Self.relayPort) }) { topology, server4, server6, relay in
            let server = family == .ipv4 ? server4 : server6
            _ = try echoThrough(topology, to: Endpoint(family.server, 80), seed: 1)
            #expect(server.peers == [Endpoint(family.routerServerSide, Self.relayPort)])
            let line = try relay.waitForLines(containing: "connection ended")[0]
            #expect(field("upstream", in: line) == Endpoint(family.server, 80).description)
            #expect(field("egress", in: line) == Endpoint(family.routerServerSide, Self.relayPort).description)
            #expect(field("end", in: line) == "completed")
        }
    }

    @Test("TPROXY with transparent: the same, the listener receiving connections to any address", arguments: Family.allCases)
    func tproxy(family: Family) throws {
        try withRelay(["--upstream", "original", "--transparent"] + Self.destinations, rules: { try $0.tproxy(port: 80, to: Self.relayPort) }) { topology, server4, server6, relay in
            let server = family == .ipv4 ? server4 : server6
            _ = try echoThrough(topology, to: Endpoint(family.server, 80), seed: 2)
            #expect(server.peers == [Endpoint(family.routerServerSide, Self.relayPort)])
            let line = try relay.waitForLines(containing: "connection ended")[0]
            #expect(field("upstream", in: line) == Endpoint(family.server, 80).description)
            #expect(field("end", in: line) == "completed")
        }
    }

    @Test("TPROXY to a listener on one address: the destination is still the accepted connection's address")
    func tproxyAddressedListener() throws {
        let listen = Endpoint(RoutedTopology.routerClientSideV4, Self.relayPort)
        try withRelay(["--upstream", "original", "--transparent"] + Self.destinations, listen: listen.description, rules: {
            try $0.tproxy(port: 80, to: Self.relayPort, address: RoutedTopology.routerClientSideV4)
        }) { topology, server4, _, relay in
            _ = try echoThrough(topology, to: Endpoint(RoutedTopology.serverV4, 80), seed: 7)
            // Dialled from the listener's own ip:P, routed out of the other interface.
            #expect(server4.peers == [listen])
            let line = try relay.waitForLines(containing: "connection ended")[0]
            #expect(field("upstream", in: line) == "10.0.2.2:80")
        }
    }

    @Test("egress client with TPROXY: the server sees the client's own address and port", arguments: Family.allCases)
    func egressClient(family: Family) throws {
        try withRelay(["--upstream", "original", "--transparent", "--egress", "client"] + Self.destinations, rules: { try $0.tproxy(port: 80, to: Self.relayPort) }) { topology, server4, server6, relay in
            let server = family == .ipv4 ? server4 : server6
            let client = try echoThrough(topology, to: Endpoint(family.server, 80), seed: 3)
            #expect(client.address == family.client)
            #expect(server.peers == [client])
            let line = try relay.waitForLines(containing: "connection ended")[0]
            #expect(field("egress", in: line) == client.description)
        }
    }

    @Test("egress client-ip with TPROXY: the server sees the client's address", arguments: Family.allCases)
    func egressClientIP(family: Family) throws {
        try withRelay(["--upstream", "original", "--transparent", "--egress", "client-ip"] + Self.destinations, rules: { try $0.tproxy(port: 80, to: Self.relayPort) }) { topology, server4, server6, _ in
            let server = family == .ipv4 ? server4 : server6
            _ = try echoThrough(topology, to: Endpoint(family.server, 80), seed: 4)
            #expect(server.peers.map(\.address) == [family.client])
        }
    }

    @Test("egress client with a listed upstream behind TPROXY: the upstream sees the client", arguments: [Family.ipv4])
    func egressClientListedUpstream(family: Family) throws {
        try withRelay(["--upstream", Endpoint(family.server, 80).description, "--transparent", "--egress", "client"], rules: { try $0.tproxy(port: 80, to: Self.relayPort) }) { topology, server4, _, _ in
            let client = try echoThrough(topology, to: Endpoint(family.server, 80), seed: 5)
            #expect(server4.peers == [client])
        }
    }

    @Test("egress client on a plain relay (clients dial the relay): the upstream sees each client", arguments: Family.allCases)
    func egressClientPlainRelay(family: Family) throws {
        try withRelay(["--upstream", Endpoint(family.server, 80).description, "--egress", "client"], rules: { try $0.deliverTransparentReplies() }) { topology, server4, server6, relay in
            let server = family == .ipv4 ? server4 : server6
            let client = try echoThrough(topology, to: Endpoint(family.routerClientSide, Self.relayPort), seed: 8)
            #expect(client.address == family.client)
            #expect(server.peers == [client])
            let line = try relay.waitForLines(containing: "connection ended")[0]
            #expect(field("egress", in: line) == client.description)
        }
    }

    @Test("4-tuples are booked per original destination: a second client to one destination is busy, another destination is not")
    func busy() throws {
        try withRelay(["--upstream", "original", "--on-busy", "reject", "--destination", "10.0.2.0/24:80-81"], rules: {
            try $0.redirect(port: 80, to: Self.relayPort)
            try $0.redirect(port: 81, to: Self.relayPort)
        }) { topology, server4, _, relay in
            let other = try topology.server.withThread { try TestServer(Endpoint(RoutedTopology.serverV4, 81), handler: TestServer.echo) }
            defer { other.stop() }
            let first = try topology.client.withThread { try TestSocket.connect(to: Endpoint(RoutedTopology.serverV4, 80)) }
            defer { first.close() }
            try first.sendAll([1])
            #expect(try first.receive(exactly: 1).bytes == [1])
            // 10.0.2.1:7000 → 10.0.2.2:80 is in use: the same destination is busy.
            // Reset (a failure is never a clean FIN), maybe before connect() has returned.
            let end = try topology.client.withThread { try endOfTurnedAway(Endpoint(RoutedTopology.serverV4, 80)) }
            #expect(end == .reset)
            let rejected = try relay.waitForLines(containing: "end=busy-rejected")[0]
            #expect(field("upstream", in: rejected) == "10.0.2.2:80")
            // Another destination port is another 4-tuple.
            _ = try echoThrough(topology, to: Endpoint(RoutedTopology.serverV4, 81), seed: 6)
            #expect(server4.peers == [Endpoint(RoutedTopology.routerServerSideV4, Self.relayPort)])
            #expect(other.peers == [Endpoint(RoutedTopology.routerServerSideV4, Self.relayPort)])
        }
    }

    @Test("A fixed egress serves destinations of its family; another family is refused and logged")
    func fixedEgressFamily() throws {
        let egress = Endpoint(RoutedTopology.routerServerSideV4, 0)
        try withRelay(["--upstream", "original", "--egress", egress.description] + Self.destinations, rules: { try $0.redirect(port: 80, to: Self.relayPort) }) { topology, server4, server6, relay in
            _ = try echoThrough(topology, to: Endpoint(RoutedTopology.serverV4, 80), seed: 9)
            #expect(server4.peers.map(\.address) == [RoutedTopology.routerServerSideV4])
            #expect(try endOfConnection(from: topology.client, to: Endpoint(RoutedTopology.serverV6, 80)) == .reset)
            let line = try relay.waitForLines(containing: "end=refused")[0]
            #expect(line.contains("cause=\"the original destination [fd00:2::2]:80 is IPv6, and the relay dials from IPv4 10.0.2.1:0: give an egress of the destination's family to forward both families\""), "\(line)")
            #expect(server6.peers.isEmpty)
        }
    }

    /// How a connection from the client namespace to `destination` ends, unused: a reset may come
    /// before connect() has returned.
    private func endOfConnection(from namespace: NetworkNamespace, to destination: Endpoint) throws -> TestSocket.End {
        do {
            let socket = try namespace.withThread { try TestSocket.connect(to: destination) }
            defer { socket.close() }
            return try socket.waitForEnd(timeout: .seconds(5))
        } catch TestError.system(_, let code) where code == ECONNRESET {
            return .reset
        }
    }

    @Test("A redirect loop (the relay's own connection redirected back to it) is refused and logged", arguments: Family.allCases)
    func loop(family: Family) throws {
        try withRelay(["--upstream", "original"] + Self.destinations, rules: {
            try $0.redirect(port: 80, to: Self.relayPort)
            try $0.redirectOwnTraffic(port: 80, to: Self.relayPort)
        }) { topology, server4, server6, relay in
            let end = try endOfConnection(from: topology.client, to: Endpoint(family.server, 80))
            #expect(end == .eof || end == .reset)
            let line = try relay.waitForLines(containing: "end=refused")[0]
            let egress = Endpoint(family.routerServerSide, Self.relayPort)
            #expect(line.contains("cause=\"the client \(egress) is this relay's own egress: a redirect loop; exempt the relay's own source port \(Self.relayPort) from the redirect rule (tcp sport != \(Self.relayPort))\""), "\(line)")
            #expect(server4.peers.isEmpty && server6.peers.isEmpty)
        }
    }

    /// One namespace, no nftables rule: conntrack is not even running there.
    @Test("A client that was not redirected is refused and logged")
    func notRedirected() throws {
        let namespace = try NetworkNamespace("\(RoutedTopology.prefix)-n")
        defer { namespace.remove() }
        let relay = try RelayProcess(["--listen", "127.0.0.1:\(Self.relayPort)", "--upstream", "original", "--destination", "127.0.0.0/8"], prefix: namespace.prefix)
        defer { relay.stop() }
        try relay.waitUntilListening()
        #expect(try endOfConnection(from: namespace, to: Endpoint(.loopbackV4, Self.relayPort)) == .reset)
        let line = try relay.waitForLines(containing: "end=refused")[0]
        #expect(line.contains("cause=\"no original destination: the connection was not redirected to the relay (an nftables REDIRECT or DNAT rule, or TPROXY with transparent = true); clients must not dial the relay directly\""), "\(line)")
    }

    @Test("A destination outside destinations, and the relay's own listener, are refused and logged; the server never sees them", arguments: Family.allCases)
    func refusals(family: Family) throws {
        try withRelay(["--upstream", "original"] + Self.destinations, rules: {
            try $0.redirect(port: 80, to: Self.relayPort)
            try $0.redirect(port: 81, to: Self.relayPort)
        }) { topology, server4, server6, relay in
            let outside = try topology.server.withThread { try TestServer(Endpoint(family.server, 81), handler: TestServer.echo) }
            defer { outside.stop() }
            // Port 81 is redirected to the relay too, but destinations allow only port 80.
            #expect(try endOfConnection(from: topology.client, to: Endpoint(family.server, 81)) == .reset)
            let outsideLine = try relay.waitForLines(containing: "end=refused")[0]
            #expect(outsideLine.contains("cause=\"the original destination \(Endpoint(family.server, 81)) is in no destinations entry (10.0.2.0/24:80, [fd00:2::]/64:80)\""), "\(outsideLine)")
            // Dialling the relay itself: its own listener as the destination (a loop).
            let own = Endpoint(family.routerClientSide, Self.relayPort)
            #expect(try endOfConnection(from: topology.client, to: own) == .reset)
            let loopLine = try relay.waitForLines(containing: "end=refused", count: 2)[1]
            #expect(loopLine.contains("cause=\"the original destination \(own) is this relay's own listener"), "\(loopLine)")
            #expect(outside.peers.isEmpty)
            #expect(server4.peers.isEmpty && server6.peers.isEmpty)
        }
    }
}

/// Start-up refusals of transparent settings: no namespace needed.
@Suite("Transparent forwarding: start-up")
struct TransparentStartupTests {
    @Test("upstream original without destinations refuses to start, naming the fix")
    func noDestinations() throws {
        let relay = try RelayProcess(["--listen", "127.0.0.1:\(try freePort())", "--upstream", "original"])
        defer { relay.stop() }
        #expect(relay.waitForExit(timeout: .seconds(10)) == 2)
        #expect(relay.output.contains("upstream \"original\" with no destinations would relay clients to any address they dial (an open proxy): list the allowed ones, e.g. destinations = [\"10.0.0.0/8:443\"] (--destination 10.0.0.0/8:443), or \"0.0.0.0/0\" and \"::/0\" to allow every destination"), "\(relay.output)")
    }

    @Test("sameport check shows upstream original with its destinations, transparent and egress client")
    func check() throws {
        let example = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Config/transparent.toml").path
        let relay = try RelayProcess(["check", "--config", example])
        #expect(relay.waitForExit(timeout: .seconds(10)) == 0, "\(relay.output)")
        let rows = relay.output.split(separator: "\n").map { $0.split(separator: " ").map(String.init) }
        #expect(rows.count == 4, "\(relay.output)")
        #expect(rows.dropFirst().first?.prefix(4) == ["redirected", "*:7000", "original", "to"])
        #expect(rows.dropFirst().first?.dropFirst(4).prefix(2) == ["10.0.0.0/8:80,10.0.0.0/8:443,[fd00::]/8:443", "same-port"])
        #expect(rows.dropFirst(2).first?.prefix(6) == ["tproxied", "*:7001,transparent", "original", "to", "10.0.0.0/8:80,10.0.0.0/8:443,[fd00::]/8:443", "client"])
    }

    @Test("transparent and egress client without CAP_NET_ADMIN: refused at start-up with the cure",
          .enabled(if: geteuid() == 0, "needs root to become nobody"))
    func missingCapability() throws {
        let nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
        let listener = try RelayProcess(
            ["--listen", "127.0.0.1:\(try freePort())", "--upstream", "original", "--destination", "10.0.0.0/8", "--transparent"], prefix: nobody)
        defer { listener.stop() }
        #expect(listener.waitForExit(timeout: .seconds(10)) != 0)
        #expect(listener.output.contains("Operation not permitted: transparent = true (IP_TRANSPARENT) needs CAP_NET_ADMIN or CAP_NET_RAW: run sameport as root, or grant AmbientCapabilities=CAP_NET_ADMIN"), "\(listener.output)")
        let egress = try RelayProcess(
            ["--listen", "127.0.0.1:\(try freePort())", "--upstream", "127.0.0.1:9", "--egress", "client"], prefix: nobody)
        defer { egress.stop() }
        #expect(egress.waitForExit(timeout: .seconds(10)) != 0)
        #expect(egress.output.contains("sameport: cannot start: egress client binds each client's own address with IP_TRANSPARENT: Operation not permitted: IP_TRANSPARENT (transparent = true, egress client or client-ip) needs CAP_NET_ADMIN or CAP_NET_RAW: run sameport as root, or grant AmbientCapabilities=CAP_NET_ADMIN"), "\(egress.output)")
    }
}
