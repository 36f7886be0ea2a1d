import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// The core promise: the upstream sees the connection come from the relay's listening ip:P.
///
///   client ──▶ relay ip:P ══(from ip:P)══▶ upstream (records getpeername)
@Suite("Fixed source port")
struct FixedSourcePortTests {
    /// Connects through the relay, exchanges a line, and returns the upstream's view of the peer.
    private func peerSeen(through relay: Endpoint, upstream: TestServer, from source: Endpoint? = nil) throws -> Endpoint? {
        let before = upstream.peers.count
        let client = try TestSocket.connect(to: relay, from: source)
        try client.sendAll(Array("ping\n".utf8))
        let reply = try client.receive(exactly: 5, timeout: .seconds(5))
        #expect(reply.bytes == Array("ping\n".utf8))
        client.close()
        _ = waitUntil(timeout: .seconds(5)) { upstream.peers.count > before }
        return upstream.peers.count > before ? upstream.peers[before] : nil
    }

    @Test("IPv4: the upstream's getpeername() is the relay's listen ip:P")
    func ipv4() throws {
        let (upstream, relay, listen) = try startEchoRelay()
        defer { relay.stop(); upstream.stop() }
        #expect(try peerSeen(through: listen, upstream: upstream) == listen)
        #expect(try peerSeen(through: listen, upstream: upstream) == listen)
        let line = try relay.waitForLines(containing: "connection ended", count: 2)[0]
        #expect(field("egress", in: line) == listen.description)
        #expect(field("upstream", in: line) == upstream.endpoint.description)
        #expect(field("end", in: line) == "completed")
        #expect(field("bytes_to_upstream", in: line) == "5")
        #expect(field("bytes_to_client", in: line) == "5")
    }

    @Test("IPv6: the upstream's getpeername() is the relay's listen [ip]:P")
    func ipv6() throws {
        let upstream = try TestServer(Endpoint(.loopbackV6, 0), handler: TestServer.echo)
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(host: .loopbackV6, upstreams: [upstream.endpoint.description])
        defer { relay.stop() }
        #expect(try peerSeen(through: listen, upstream: upstream) == listen)
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("egress", in: line) == "[::1]:\(listen.port)")
    }

    @Test("*:P: the egress is the address the client reached, IPv4 and IPv6")
    func wildcard() throws {
        // One dual-stack upstream, reachable as 127.0.0.1 and ::1 under one name.
        let upstream = try TestServer(Endpoint(.anyV6, 0), dualStack: true, handler: TestServer.echo)
        defer { upstream.stop() }
        let port = upstream.endpoint.port
        let (relay, listen) = try startRelay(
            listenText: { "*:\($0)" }, upstreams: ["127.0.0.1:\(port)", "[::1]:\(port)"])
        defer { relay.stop() }
        for reached in [IPAddress.loopbackV4, IPAddress("127.0.0.2")!, IPAddress.loopbackV6] {
            let target = Endpoint(reached, listen.port)
            #expect(try peerSeen(through: target, upstream: upstream) == target, "client reached \(target)")
        }
    }

    @Test("--egress IP:PORT dials from that ip:port")
    func explicitEgress() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let egress = Endpoint(IPAddress("127.0.0.3")!, try freePort())
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description], ["--egress", egress.description])
        defer { relay.stop() }
        #expect(try peerSeen(through: listen, upstream: upstream) == egress)
    }

    @Test("--egress ephemeral dials from the reached IP with a kernel-chosen port")
    func ephemeralEgress() throws {
        let (upstream, relay, listen) = try startEchoRelay(["--egress", "ephemeral"])
        defer { relay.stop(); upstream.stop() }
        let peer = try #require(try peerSeen(through: listen, upstream: upstream))
        #expect(peer.address == listen.address)
        #expect(peer.port != listen.port)
    }
}
