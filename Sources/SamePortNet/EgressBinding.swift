import Glibc
import SamePortCore

/// How an upstream socket is bound before it connects.
public enum EgressBinding: Hashable, Sendable, CustomStringConvertible {
    /// Bound to this exact ip:port, sharing it with the listener (SO_REUSEADDR + SO_REUSEPORT).
    case fixed(Endpoint)
    /// Bound to this IP with a port the kernel picks at connect time (IP_BIND_ADDRESS_NO_PORT).
    case ephemeral(IPAddress)

    /// How a relay with egress `mode` dials for a client that reached `local` (the accepted
    /// socket's getsockname, or the listener's own address).
    public init(mode: EgressMode, local: Endpoint) {
        let local = local.unmapped
        switch mode {
        case .samePort: self = .fixed(local)
        case .ephemeral: self = .ephemeral(local.address)
        case .fixed(let endpoint): self = endpoint.port == 0 ? .ephemeral(endpoint.address) : .fixed(endpoint)
        }
    }

    /// The IP the egress socket binds.
    public var address: IPAddress {
        switch self {
        case .fixed(let endpoint): return endpoint.address
        case .ephemeral(let address): return address
        }
    }

    /// The family of the egress socket.
    public var isIPv6: Bool { address.isIPv6 }

    /// The fixed ip:port whose 4-tuples must be booked; nil when the kernel chooses the port.
    public var bookedEndpoint: Endpoint? {
        if case .fixed(let endpoint) = self { return endpoint }
        return nil
    }

    /// What to do about a failure to bind the egress socket, for messages.
    static func hint(for errno: Errno) -> String? {
        switch errno {
        case .addressInUse:
            return "another socket holds this address without SO_REUSEPORT, or belongs to another user"
        case .permissionDenied:
            return "ports below 1024 need CAP_NET_BIND_SERVICE for the egress socket too"
        case .addressNotAvailable:
            return "the egress IP is not an address of this host"
        default:
            return nil
        }
    }

    public var description: String {
        switch self {
        case .fixed(let endpoint): return endpoint.description
        case .ephemeral(let address): return Endpoint(address, 0).description
        }
    }

    /// Creates a socket bound as this binding says, not yet connected.
    ///
    /// The caller owns the returned socket. Errors name the step that failed.
    public func makeSocket() throws(SystemError) -> Socket {
        let socket = try Socket.tcp(ipv6: isIPv6)
        socket.setUrgentDataInline()
        do {
            switch self {
            case .fixed(let endpoint):
                try socket.setReuseAddressAndPort()
                try socket.bind(to: endpoint)
            case .ephemeral(let address):
                // Defers the port choice to connect(), so one source port can serve many
                // destinations (ip(7)); bind(ip:0) alone would reserve a port per socket. The
                // option lives at the IPPROTO_IP level for IPv6 sockets too.
                try socket.setOption(
                    level: Int32(IPPROTO_IP), name: IP_BIND_ADDRESS_NO_PORT, value: 1,
                    callName: "setsockopt(IP_BIND_ADDRESS_NO_PORT)")
                try socket.bind(to: Endpoint(address, 0))
            }
            return socket
        } catch {
            socket.close()
            throw error
        }
    }
}
