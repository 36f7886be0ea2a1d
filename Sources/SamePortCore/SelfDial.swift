/// Whether an upstream is the relay's own listener: a relay that dials itself never serves
/// anyone. With a same-port egress the upstream socket, bound to the very ip:P it connects to,
/// connects to itself (a TCP simultaneous open) and echoes the client; with an ephemeral egress
/// the relay accepts its own connection, dials again, and so on until max_connections is used up.
public enum SelfDial {
    /// True when a connection to `upstream` reaches a listener bound to `listener`.
    ///
    /// - Parameters:
    ///   - acceptsIPv4: a wildcard `[::]` listener that is dual-stack (not IPV6_V6ONLY).
    ///   - isLocal: whether an address is one of this host's (a wildcard listener takes them all).
    public static func reaches(
        _ upstream: Endpoint, listener: Endpoint, acceptsIPv4: Bool = true, isLocal: (IPAddress) -> Bool
    ) -> Bool {
        let upstream = upstream.unmapped
        guard upstream.port == listener.port else { return false }
        let listening = listener.address.unmapped
        // Linux takes a connect() to 0.0.0.0 or :: for one to the local host.
        if upstream.address.isUnspecified { return true }
        guard listening.isUnspecified else { return upstream.address == listening }
        if listening.isIPv6 != upstream.address.isIPv6, !(listening.isIPv6 && acceptsIPv4) { return false }
        return isLocal(upstream.address)
    }

    /// What to do about it, for messages.
    public static let fix = "give the upstream's own address, or listen on another port"
}
