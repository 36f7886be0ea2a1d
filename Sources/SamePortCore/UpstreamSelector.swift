/// Chooses an upstream for each client so that no two connections share a 4-tuple.
///
/// With the source pinned to ip:P, only one connection at a time can exist from that egress to a
/// given upstream ip:port; a second connect() fails with EADDRNOTAVAIL. The selector books the
/// (egress, upstream address) pairs the relay has in use and hands out only upstreams whose pairs
/// are all free, starting from a round-robin cursor so that load spreads over the list. An upstream
/// is booked with every address of its family at once, because the dialer may fall through to any
/// of them. Egresses with a kernel-chosen port (nil) are never booked: the kernel picks a free port.
public struct UpstreamSelector: Sendable {
    /// An upstream handed to one connection: the addresses to try, in order.
    public struct Reservation: Hashable, Sendable {
        /// The index of the upstream in the relay's list, or `Reservation.originalDestination`.
        public var upstreamIndex: Int
        /// The fixed egress the pairs are booked under; nil for a kernel-chosen port.
        public var egress: Endpoint?
        /// The upstream's addresses of the egress's family, in resolver order.
        public var addresses: [Endpoint]

        /// The index of a reservation for a client's original destination, in no list.
        public static let originalDestination = -1

        /// Whether this is the client's original destination rather than a listed upstream.
        public var isOriginalDestination: Bool { upstreamIndex == Self.originalDestination }
    }

    /// What `reserve` found.
    public enum Outcome: Hashable, Sendable {
        case reserved(Reservation)
        /// Every upstream with an address of the right family is in use from this egress.
        case busy
        /// No upstream has an address of the egress's family (IPv4 vs IPv6).
        case noAddressOfFamily
    }

    private struct Pair: Hashable {
        var egress: Endpoint
        var upstream: Endpoint
    }

    /// The resolved addresses of each upstream, in the configured order.
    public let upstreams: [[Endpoint]]
    private var inUse: Set<Pair> = []
    private var cursor = 0
    /// Upstreams that failed to connect, with the time (in the caller's nanosecond clock) until
    /// which they are passed over.
    private var downUntil: [Int: UInt64] = [:]

    /// Each upstream's addresses of one family, computed once: a reservation shares these
    /// arrays instead of allocating its own.
    private let ipv4Addresses: [[Endpoint]]
    private let ipv6Addresses: [[Endpoint]]

    public init(upstreams: [[Endpoint]]) {
        self.upstreams = upstreams.map { $0.map(\.unmapped) }
        ipv4Addresses = self.upstreams.map { $0.filter { !$0.address.isIPv6 } }
        ipv6Addresses = self.upstreams.map { $0.filter { $0.address.isIPv6 } }
    }

    /// The number of booked (egress, upstream) pairs.
    public var pairsInUse: Int { inUse.count }

    /// Books a free upstream for a connection from `egress`.
    ///
    /// - Parameters:
    ///   - egress: the fixed egress ip:P, or nil when the kernel chooses the port.
    ///   - isIPv6: the family of the egress socket; only upstream addresses of it can be dialled.
    ///   - excluding: upstreams not to hand out (those a connection already failed to reach).
    ///   - now: the current time, in the same nanosecond clock as `markDown`; an upstream marked
    ///     down is handed out only when no other candidate exists, busy or free.
    public mutating func reserve(egress: Endpoint?, isIPv6: Bool, excluding: Set<Int> = [], now: UInt64 = 0) -> Outcome {
        // The common case, under the relay's lock on every connection: nothing is down.
        if downUntil.isEmpty { return reserve(egress: egress, isIPv6: isIPv6, excluding: excluding) }
        let down = Set(downUntil.filter { $0.value > now }.keys)
        downUntil = downUntil.filter { $0.value > now }
        let healthy = reserve(egress: egress, isIPv6: isIPv6, excluding: excluding.union(down))
        // A healthy upstream that is only busy is worth waiting for; a down one is tried only when
        // no healthy candidate exists at all.
        guard case .noAddressOfFamily = healthy, !down.isEmpty else { return healthy }
        return reserve(egress: egress, isIPv6: isIPv6, excluding: excluding)
    }

    /// Passes over `index` until `until` (nanoseconds, the clock `reserve` is given), unless no
    /// other upstream can be had: an upstream that refused or timed out is likely to again.
    public mutating func markDown(_ index: Int, until: UInt64) {
        downUntil[index] = until
    }

    private mutating func reserve(egress: Endpoint?, isIPv6: Bool, excluding: Set<Int>) -> Outcome {
        let egress = egress?.unmapped
        var sawFamily = false
        for step in 0..<upstreams.count {
            let index = (cursor + step) % upstreams.count
            if excluding.contains(index) { continue }
            let addresses = isIPv6 ? ipv6Addresses[index] : ipv4Addresses[index]
            guard !addresses.isEmpty else { continue }
            sawFamily = true
            if let egress {
                guard addresses.allSatisfy({ !inUse.contains(Pair(egress: egress, upstream: $0)) }) else { continue }
                for address in addresses { inUse.insert(Pair(egress: egress, upstream: address)) }
            }
            cursor = (index + 1) % upstreams.count
            return .reserved(Reservation(upstreamIndex: index, egress: egress, addresses: addresses))
        }
        return sawFamily ? .busy : .noAddressOfFamily
    }

    /// Books the pair (`egress`, `destination`) for a connection to a client's original
    /// destination (`upstream = "original"`): busy while another connection from `egress` holds it.
    /// The reservation's index is `Reservation.originalDestination`: there is no other upstream to
    /// fail over to.
    public mutating func reserve(egress: Endpoint?, destination: Endpoint) -> Outcome {
        let destination = destination.unmapped
        let egress = egress?.unmapped
        if let egress {
            let pair = Pair(egress: egress, upstream: destination)
            guard !inUse.contains(pair) else { return .busy }
            inUse.insert(pair)
        }
        return .reserved(Reservation(upstreamIndex: Reservation.originalDestination, egress: egress, addresses: [destination]))
    }

    /// Books the pairs of a reservation that an earlier selector handed out (a reload replaced the
    /// upstream list): its connection still holds them until `release`.
    public mutating func adopt(_ reservation: Reservation) {
        guard let egress = reservation.egress else { return }
        inUse.formUnion(reservation.addresses.map { Pair(egress: egress.unmapped, upstream: $0.unmapped) })
    }

    /// Frees the pairs of a reservation once its connection has ended.
    public mutating func release(_ reservation: Reservation) {
        guard let egress = reservation.egress else { return }
        for address in reservation.addresses {
            inUse.remove(Pair(egress: egress, upstream: address))
        }
    }
}
