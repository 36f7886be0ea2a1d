import Glibc
import SamePortCore
import SamePortTestSupport
import Testing
@testable import SamePortNet

/// The egress bindings of transparent forwarding, and the socket calls behind them.
@Suite("Transparent sockets")
struct TransparentSocketTests {
    private let local = Endpoint(.loopbackV4, 7000)
    private let client = Endpoint(IPAddress("::ffff:10.0.1.2") ?? .anyV6, 40000)

    @Test("egress client binds the client's ip:port, client-ip its IP; a probe binds the local IP the same way")
    func bindings() {
        let clientV4 = Endpoint(IPAddress("10.0.1.2") ?? .anyV4, 40000)
        #expect(EgressBinding(mode: .client, local: local, client: client) == .transparent(clientV4))
        #expect(EgressBinding(mode: .clientIP, local: local, client: client) == .transparentIP(clientV4.address))
        #expect(EgressBinding(mode: .client, local: local) == .transparentIP(.loopbackV4))
        #expect(EgressBinding(mode: .samePort, local: local, client: client) == .fixed(local))
        // Only a fixed port is booked; on_busy ephemeral keeps the IP and drops the port.
        #expect(EgressBinding.transparent(clientV4).bookedEndpoint == clientV4)
        #expect(EgressBinding.transparentIP(clientV4.address).bookedEndpoint == nil)
        #expect(EgressBinding.transparent(clientV4).withKernelPort == .transparentIP(clientV4.address))
        #expect(EgressBinding.fixed(local).withKernelPort == .ephemeral(.loopbackV4))
        #expect(EgressBinding.transparent(clientV4).description == "10.0.1.2:40000")
    }

    @Test("Only this host's addresses are local")
    func locality() {
        #expect(Socket.isLocal(.loopbackV4))
        #expect(Socket.isLocal(.loopbackV6))
        #expect(!Socket.isLocal(IPAddress("192.0.2.1") ?? .anyV4))
    }

    @Test("A transparent egress binds an address that is not the host's (in a namespace of the test's own)",
          .enabled(if: geteuid() == 0, "IP_TRANSPARENT needs CAP_NET_ADMIN"))
    func foreignBind() throws {
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        let foreign = Endpoint(IPAddress("10.0.1.2") ?? .anyV4, 40000)
        let bound = try namespace.withThread { () throws -> Endpoint in
            #expect(throws: SystemError("bind", .addressNotAvailable)) { try EgressBinding.fixed(foreign).makeSocket() }
            let socket = try EgressBinding.transparent(foreign).makeSocket()
            defer { socket.close() }
            #expect(try socket.option(level: Int32(IPPROTO_IP), name: IP_TRANSPARENT) == 1)
            return try socket.localEndpoint()
        }
        #expect(bound == foreign)
    }

    @Test("A socket from systemd is made transparent (transparent = true)",
          .enabled(if: geteuid() == 0, "IP_TRANSPARENT needs CAP_NET_ADMIN"))
    func inheritedTransparent() throws {
        for address in [IPAddress.loopbackV4, .loopbackV6] {
            let socket = try Socket.tcp(ipv6: address.isIPv6)
            try socket.bind(to: Endpoint(address, 0))
            try socket.listen(backlog: 1)
            let listener = try Listener.adopt(fd: socket.fd, label: "socket \(socket.fd)")
            defer { listener.close() }
            try listener.makeTransparent()
            let option = address.isIPv6
                ? try socket.option(level: Int32(IPPROTO_IPV6), name: IPV6_TRANSPARENT)
                : try socket.option(level: Int32(IPPROTO_IP), name: IP_TRANSPARENT)
            #expect(option == 1)
            // A second call finds it set and asks nothing of the kernel.
            try listener.makeTransparent()
        }
    }

    @Test("A socket that was not redirected has no original destination (ENOENT)")
    func noOriginalDestination() throws {
        let listening = try Socket.tcp(ipv6: false)
        defer { listening.close() }
        try listening.bind(to: Endpoint(.loopbackV4, 0))
        try listening.listen(backlog: 1)
        // A namespace-free check: conntrack may or may not track loopback here, so only a refusal
        // as ENOENT, or the socket's own address (tracked, not rewritten), is acceptable.
        let endpoint = try listening.localEndpoint()
        let client = try TestSocket.connect(to: endpoint)
        defer { client.close() }
        guard let (accepted, _) = try waitForAccept(listening) else {
            Issue.record("no connection accepted")
            return
        }
        defer { accepted.close() }
        do {
            #expect(try accepted.originalDestination(ipv6: false) == endpoint)
        } catch {
            #expect(error == SystemError("getsockopt(SO_ORIGINAL_DST)", Errno(rawValue: ENOENT)))
        }
    }

    private func waitForAccept(_ listening: Socket) throws -> (Socket, Endpoint?)? {
        var accepted: (Socket, Endpoint?)?
        _ = try waitUntil(timeout: .seconds(5)) {
            accepted = try listening.accept()
            return accepted != nil
        }
        return accepted
    }
}
