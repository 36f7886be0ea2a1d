/// How many connections (open, dialling or queued) each client address holds, for a relay's
/// `max_per_client`: one address cannot take every (egress, upstream) pair.
public struct ClientCounts: Sendable, Equatable {
    private var counts: [IPAddress: Int] = [:]

    public init() {}

    /// The connections `address` holds.
    public subscript(address: IPAddress) -> Int { counts[address] ?? 0 }

    /// The addresses holding any: bounded by the relay's connections, never by addresses seen.
    public var addressCount: Int { counts.count }

    public mutating func add(_ address: IPAddress) {
        counts[address, default: 0] += 1
    }

    /// Releases one of `address`'s; an address that holds none is forgotten.
    public mutating func remove(_ address: IPAddress) {
        guard let count = counts[address] else { return }
        counts[address] = count > 1 ? count - 1 : nil
    }
}
