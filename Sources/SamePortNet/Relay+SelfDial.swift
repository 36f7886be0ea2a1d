import Glibc
import SamePortCore

/// A relay that would dial itself (`SelfDial`): refused at start-up and on reload when the
/// resolved upstreams show it, and caught at each dial otherwise (an address a wildcard listener
/// takes that became local after start-up).
extension Relay {
    /// Refuses a spec one of whose upstream addresses is this relay's own listener.
    func refuseSelfDial(listener: Endpoint, acceptsIPv4: Bool, spec: RelaySpec, upstreams: [[Endpoint]]) throws(StartupError) {
        for (upstream, addresses) in zip(spec.upstreams, upstreams) {
            guard let own = addresses.first(where: {
                SelfDial.reaches($0, listener: listener, acceptsIPv4: acceptsIPv4, isLocal: Socket.isLocal)
            }) else { continue }
            let resolved = upstream.endpoint == nil ? " (\(own.unmapped))" : ""
            let which = listener.address.isUnspecified
                ? "own listener (\(spec.listen) takes every address of this host)"
                : "own listen address \(listener.unmapped)"
            throw StartupError("upstream \(upstream)\(resolved) is this relay's \(which): the relay would dial itself; \(SelfDial.fix)")
        }
    }

    /// True when dialling `address` would reach this relay's own listener; asked before each dial.
    /// Costs a comparison, and a bind probe only for a wildcard listener's port.
    func dialsItself(_ address: Endpoint) -> Bool {
        guard let listenEndpoint else { return false }
        return SelfDial.reaches(address, listener: listenEndpoint, acceptsIPv4: listenerAcceptsIPv4, isLocal: Socket.isLocal)
    }
}
