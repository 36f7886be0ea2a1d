import Glibc
import SamePortCore
import SamePortTestSupport
import Testing
@testable import SamePortNet

/// The kernel rules the fixed-port dialer is built on, checked on real sockets.
@Suite("Sockets and egress binding")
struct SocketTests {
    /// A listening socket on a free loopback port, with or without SO_REUSEPORT.
    private func listener(reusePort: Bool, address: IPAddress = .loopbackV4) throws -> (Socket, Endpoint) {
        let socket = try Socket.tcp(ipv6: address.isIPv6)
        if reusePort {
            try socket.setReuseAddressAndPort()
        } else {
            try socket.setOption(level: SOL_SOCKET, name: SO_REUSEADDR, value: 1)
        }
        try socket.bind(to: Endpoint(address, 0))
        try socket.listen(backlog: 16)
        return (socket, try socket.localEndpoint())
    }

    @Test("SO_REUSEADDR and SO_REUSEPORT are both set, as two options")
    func bothOptions() throws {
        let socket = try Socket.tcp(ipv6: false)
        defer { socket.close() }
        try socket.setReuseAddressAndPort()
        #expect(try socket.option(level: SOL_SOCKET, name: SO_REUSEADDR) == 1)
        #expect(try socket.option(level: SOL_SOCKET, name: SO_REUSEPORT) == 1)
    }

    @Test("An egress socket binds the ip:P of a listener that has SO_REUSEPORT", arguments: [IPAddress.loopbackV4, .loopbackV6])
    func egressBesideListener(address: IPAddress) throws {
        let (listening, endpoint) = try listener(reusePort: true, address: address)
        defer { listening.close() }
        let egress = try EgressBinding.fixed(endpoint).makeSocket()
        defer { egress.close() }
        #expect(try egress.localEndpoint() == endpoint)
    }

    @Test("Without SO_REUSEPORT on the listener the egress bind fails with EADDRINUSE")
    func egressNeedsReusePort() throws {
        let (listening, endpoint) = try listener(reusePort: false)
        defer { listening.close() }
        #expect(throws: SystemError("bind", .addressInUse)) { try EgressBinding.fixed(endpoint).makeSocket() }
    }

    @Test("From one ip:P, a second connection to the same upstream fails with EADDRNOTAVAIL; another upstream works")
    func fourTupleRule() throws {
        let (listening, egress) = try listener(reusePort: true)
        defer { listening.close() }
        let upstreamA = try TestServer(handler: TestServer.hold)
        defer { upstreamA.stop() }
        let upstreamB = try TestServer(handler: TestServer.hold)
        defer { upstreamB.stop() }
        let first = try EgressBinding.fixed(egress).makeSocket()
        defer { first.close() }
        _ = try first.connect(to: upstreamA.endpoint)
        #expect(waitUntil(timeout: .seconds(5)) { upstreamA.peers.count == 1 })
        let second = try EgressBinding.fixed(egress).makeSocket()
        defer { second.close() }
        #expect(throws: SystemError("connect", .addressNotAvailable)) { try second.connect(to: upstreamA.endpoint) }
        let third = try EgressBinding.fixed(egress).makeSocket()
        defer { third.close() }
        _ = try third.connect(to: upstreamB.endpoint)
        #expect(waitUntil(timeout: .seconds(5)) { upstreamB.peers == [egress] })
        #expect(upstreamA.peers == [egress])
    }

    @Test("Ephemeral egress keeps the IP and lets the kernel choose the port at connect")
    func ephemeralBinding() throws {
        let upstream = try TestServer(handler: TestServer.hold)
        defer { upstream.stop() }
        let socket = try EgressBinding.ephemeral(IPAddress("127.0.0.4")!).makeSocket()
        defer { socket.close() }
        #expect(try socket.option(level: Int32(IPPROTO_IP), name: IP_BIND_ADDRESS_NO_PORT) == 1)
        #expect(try socket.localEndpoint().port == 0)
        _ = try socket.connect(to: upstream.endpoint)
        #expect(waitUntil(timeout: .seconds(5)) { upstream.peers.count == 1 })
        #expect(upstream.peers.first?.address == IPAddress("127.0.0.4"))
        #expect(upstream.peers.first?.port != 0)
    }

    @Test("A system error prints as call, text and errno")
    func errorText() {
        #expect(SystemError("connect", .connectionRefused).description == "connect: Connection refused (errno 111)")
    }

    @Test("Literal upstreams are not looked up; IPv4-mapped ones are unmapped")
    func resolveLiterals() throws {
        #expect(try Resolver.resolve(HostPort(parsing: "127.0.0.1:80")) == [Endpoint(.loopbackV4, 80)])
        #expect(try Resolver.resolve(HostPort(parsing: "[::ffff:127.0.0.1]:80")) == [Endpoint(.loopbackV4, 80)])
        #expect(try Resolver.resolve(HostPort(parsing: "localhost:80")).contains(Endpoint(.loopbackV4, 80)))
    }
}
