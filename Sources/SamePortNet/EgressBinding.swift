import Glibc
import SamePortCore

/// How an upstream socket is bound before it connects.
public enum EgressBinding: Hashable, Sendable, CustomStringConvertible {
    /// Bound to this exact ip:port, sharing it with the listener (SO_REUSEADDR + SO_REUSEPORT).
    case fixed(Endpoint)
    /// Bound to this IP with a port the kernel picks at connect time (IP_BIND_ADDRESS_NO_PORT).
    case ephemeral(IPAddress)

    /// The family of the egress socket.
    public var isIPv6: Bool {
        switch self {
        case .fixed(let endpoint): return endpoint.address.isIPv6
        case .ephemeral(let address): return address.isIPv6
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
