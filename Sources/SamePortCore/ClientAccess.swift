/// An address block written as `ADDRESS/PREFIX` (`10.0.0.0/8`, `fd00::/8`), or a single address.
public struct CIDR: Hashable, Sendable, CustomStringConvertible {
    public var address: IPAddress
    public var prefixLength: Int

    /// Parses `ADDRESS/PREFIX` or a bare address (a /32 or /128). Bits set past the prefix are an
    /// error rather than silently dropped: `10.1.0.0/8` is more likely a typo than meant.
    public init(parsing text: String) throws(OptionError) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let address = IPAddress(parts[0]) else {
            throw OptionError("invalid CIDR '\(text)': '\(parts[0])' is not an IPv4 or IPv6 address; expected ADDRESS/PREFIX such as 10.0.0.0/8 or fd00::/8")
        }
        let maximum = address.isIPv6 ? 128 : 32
        var length = maximum
        if parts.count == 2 {
            guard parts[1].allSatisfy(\.isASCIIDigit), let value = Int(parts[1]), value <= maximum else {
                throw OptionError("invalid CIDR '\(text)': the prefix length '\(parts[1])' is not a number from 0 to \(maximum)")
            }
            length = value
        }
        let network = Self.masked(address, length)
        guard network == address else {
            throw OptionError("invalid CIDR '\(text)': the address has bits set past the /\(length) prefix; did you mean \(network)/\(length)?")
        }
        // IPv4-mapped (::ffff:a.b.c.d/96 and longer) is the IPv4 block it stands for: clients are
        // matched as IPv4 addresses.
        if address.isIPv6, address.unmapped != address, length >= 96 {
            self.address = address.unmapped
            self.prefixLength = length - 96
        } else {
            self.address = address
            self.prefixLength = length
        }
    }

    /// Whether `candidate` is in this block. An IPv4-mapped IPv6 address (a client of a dual-stack
    /// listener) is matched as the IPv4 address it carries.
    public func contains(_ candidate: IPAddress) -> Bool {
        let candidate = candidate.unmapped
        guard candidate.isIPv6 == address.isIPv6 else { return false }
        return Self.masked(candidate, prefixLength) == address
    }

    public var description: String { "\(address)/\(prefixLength)" }

    private static func masked(_ address: IPAddress, _ length: Int) -> IPAddress {
        switch address {
        case .v4(let value):
            return .v4(length == 0 ? 0 : value & ~UInt32(0) << (32 - length))
        case .v6(let high, let low):
            let highMask: UInt64 = length >= 64 ? ~0 : (length == 0 ? 0 : ~UInt64(0) << (64 - length))
            let lowMask: UInt64 = length <= 64 ? 0 : (length == 128 ? ~0 : ~UInt64(0) << (128 - length))
            return .v6(high: high & highMask, low: low & lowMask)
        }
    }
}

/// Which clients a relay serves: none in `deny`, and, when `allow` is not empty, only those in it.
/// Deny wins over allow.
public struct ClientAccess: Hashable, Sendable {
    public var allow: [CIDR]
    public var deny: [CIDR]

    public init(allow: [CIDR] = [], deny: [CIDR] = []) {
        self.allow = allow
        self.deny = deny
    }

    /// Every client is served.
    public var isOpen: Bool { allow.isEmpty && deny.isEmpty }

    /// Why `client` is refused, or nil when it is served.
    public func refusal(of client: IPAddress) -> String? {
        if let block = deny.first(where: { $0.contains(client) }) {
            return "the client is in deny \(block)"
        }
        if !allow.isEmpty, !allow.contains(where: { $0.contains(client) }) {
            return "the client is in no allow block (\(allow.map(\.description).joined(separator: ", ")))"
        }
        return nil
    }
}
