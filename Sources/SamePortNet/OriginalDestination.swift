import CSamePortShims
import Glibc
import SamePortCore

/// Transparent forwarding at the socket level: the destination a redirected client dialled, and
/// the IP_TRANSPARENT option that TPROXY listeners and client-address egress need.
///
/// Three ways a relay meets a client that dialled another address (transparent.md):
/// - REDIRECT / DNAT rewrote the packets to the relay's listener; conntrack remembers the original
///   destination, which SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6) returns. A socket
///   conntrack knows nothing of gets ENOENT; one that was tracked but not rewritten gets its own
///   local address back (the relay's listener), which the caller must treat as "not redirected".
/// - TPROXY delivered the packets unchanged to a listener with IP_TRANSPARENT: the accepted
///   socket's own address (getsockname) is the destination.
/// - Egress from an address that is not this host's (the client's) binds with IP_TRANSPARENT.
extension Socket {
    /// getsockopt(SOL_IP, SO_ORIGINAL_DST), or (SOL_IPV6, IP6T_SO_ORIGINAL_DST) for an IPv6
    /// client: the destination before REDIRECT/DNAT. ENOENT when conntrack has no entry for it.
    ///
    /// - Parameter ipv6: the client's family (an IPv4 client of a dual-stack socket is IPv4 here:
    ///   its connection was tracked, and redirected, as IPv4).
    public func originalDestination(ipv6: Bool) throws(SystemError) -> Endpoint {
        var address = SocketAddress()
        let level = ipv6 ? Int32(IPPROTO_IPV6) : Int32(IPPROTO_IP)
        let name = ipv6 ? sameport_ip6t_so_original_dst : sameport_so_original_dst
        let call = ipv6 ? "getsockopt(IP6T_SO_ORIGINAL_DST)" : "getsockopt(SO_ORIGINAL_DST)"
        _ = try systemCall(call) {
            address.withMutableSockAddr { pointer, length in getsockopt(fd, level, name, pointer, length) }
        }
        guard let endpoint = address.endpoint else { throw SystemError(call, .addressFamilyNotSupported) }
        return endpoint.unmapped
    }

    /// IP_TRANSPARENT (IPV6_TRANSPARENT for an IPv6 socket): the socket may bind an address that
    /// is not this host's (egress client), and a listener with it receives TPROXY's connections.
    /// EPERM without CAP_NET_ADMIN or CAP_NET_RAW.
    public func setTransparent(ipv6: Bool) throws(SystemError) {
        if ipv6 {
            try setOption(level: Int32(IPPROTO_IPV6), name: IPV6_TRANSPARENT, value: 1, callName: "setsockopt(IPV6_TRANSPARENT)")
        } else {
            try setOption(level: Int32(IPPROTO_IP), name: IP_TRANSPARENT, value: 1, callName: "setsockopt(IP_TRANSPARENT)")
        }
    }

    /// Whether `address` is one of this host's (network namespace's) own: a plain UDP socket can
    /// bind it (loopback always is). How a relay on a wildcard listener recognises a destination, or
    /// an upstream, that is itself.
    static func isLocal(_ address: IPAddress) -> Bool {
        if address.isLoopback { return true }
        let fd = Glibc.socket(address.isIPv6 ? AF_INET6 : AF_INET, Int32(SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        let socketAddress = SocketAddress(Endpoint(address, 0))
        return socketAddress.withSockAddr { Glibc.bind(fd, $0, $1) } == 0
    }
}
