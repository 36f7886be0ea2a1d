import Glibc
import SamePortCore

/// Where an accepted client goes and where its upstream connection comes from.
///
/// Design note: the client an arrival is routed for is `Arrival.clientEndpoint`, one value. It
/// counts for the egress (`egress = "client"` binds it) and the log line; a client address
/// announced by a proxy in front (the PROXY protocol's `accept_proxy`) replaces that value
/// before `route` runs, and everything downstream follows.
///
/// With `upstream = "original"` the destination is the one the client dialled, checked against
/// the relay's `destinations`, its own listener (a redirect loop), and its absence (a client that
/// was not redirected). The egress of a wildcard listener is then the wildcard of the
/// destination's family on port P: the kernel picks the source address of the route to the
/// destination, and every destination sees the relay's fixed port.
extension Relay {
    /// Fills in `arrival.destination` (with `upstream = "original"`) and `arrival.binding`; or
    /// returns why the client is refused, for its log line.
    ///
    /// - Parameter listener: the address the listener is bound to (its real port).
    static func route(_ arrival: inout Arrival, spec: RelaySpec, listener: Endpoint?) -> String? {
        if spec.transparent {
            // What TPROXY delivered the connection to (the listener's own address is no hint).
            do {
                arrival.local = try arrival.client.localEndpoint().unmapped
            } catch {
                return "cannot read the address the client reached: \(error)"
            }
        }
        var egressLocal = arrival.local
        let client = arrival.clientEndpoint.unmapped
        if spec.forwardsToOriginal {
            let destination: Endpoint
            switch originalDestination(of: arrival, transparent: spec.transparent) {
            case .success(let found): destination = found
            case .failure(let refusal): return refusal.message
            }
            arrival.destination = destination
            egressLocal = Self.egressLocal(listener: listener, fallback: arrival.local, family: destination.address)
            // Set before the checks, so that a refusal's log line names the egress it would have had.
            arrival.binding = EgressBinding(mode: spec.egress, local: egressLocal, client: client)
            if let listener {
                if isOwnListener(destination, listener: listener) {
                    return "the original destination \(destination) is this relay's own listener: the client dialled the relay directly, or a rule sends the relay's traffic back to it (a redirect loop)"
                }
                if client.port == listener.port, Socket.isLocal(client.address), !spec.egress.presentsClient {
                    return "the client \(client) is this relay's own egress: a redirect loop; exempt the relay's own source port \(listener.port) from the redirect rule (tcp sport != \(listener.port))"
                }
            }
            if let refusal = spec.destinations.refusal(of: destination) {
                return refusal
            }
            if arrival.binding.isIPv6 != destination.address.isIPv6 {
                let fix = spec.listen.host == .any ? "give an egress of the destination's family" : "listen on *:\(spec.listen.port)"
                return "the original destination \(destination) is \(destination.address.familyName), and the relay dials from \(arrival.binding.address.familyName) \(arrival.binding): \(fix) to forward both families"
            }
        } else if spec.transparent {
            // The accepted socket's address is the client's destination, not this host's.
            egressLocal = Self.egressLocal(listener: listener, fallback: arrival.local, family: client.address)
        }
        arrival.binding = EgressBinding(mode: spec.egress, local: egressLocal, client: client)
        return nil
    }

    /// A refusal with its log text.
    struct Refusal: Error {
        var message: String
    }

    /// The destination the client dialled: the accepted socket's own address under TPROXY, else
    /// what conntrack remembers from REDIRECT/DNAT.
    private static func originalDestination(of arrival: Arrival, transparent: Bool) -> Result<Endpoint, Refusal> {
        if transparent { return .success(arrival.local.unmapped) }
        do {
            return .success(try arrival.client.originalDestination(ipv6: arrival.clientEndpoint.unmapped.address.isIPv6))
        } catch where error.errno == Errno(rawValue: ENOENT) {
            return .failure(Refusal(message: "no original destination: the connection was not redirected to the relay (an nftables REDIRECT or DNAT rule, or TPROXY with transparent = true); clients must not dial the relay directly"))
        } catch {
            return .failure(Refusal(message: "cannot read the original destination: \(error)"))
        }
    }

    /// Whether `destination` is the relay's own listening address (any of this host's addresses,
    /// for a wildcard listener).
    private static func isOwnListener(_ destination: Endpoint, listener: Endpoint) -> Bool {
        guard destination.port == listener.port else { return false }
        let bound = listener.address.unmapped
        if bound.isUnspecified { return Socket.isLocal(destination.address) }
        return bound == destination.address.unmapped
    }

    /// The relay's own ip:P to dial from: the listener's address, or for a wildcard listener the
    /// wildcard of `family`'s family (the route to the upstream picks the source address).
    private static func egressLocal(listener: Endpoint?, fallback: Endpoint, family: IPAddress) -> Endpoint {
        guard let listener else { return fallback }
        guard listener.address.isUnspecified else { return listener.unmapped }
        return Endpoint(family.unmapped.isIPv6 ? .anyV6 : .anyV4, listener.port)
    }
}
