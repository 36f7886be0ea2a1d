/// An IPv4 or IPv6 address, parsed and printed without the C library.
///
/// IPv6 addresses print in the RFC 5952 canonical form (lower case, longest zero run as `::`).
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) stay IPv6 until `unmapped` is asked for: the
/// relay normalises them so that one 4-tuple is never booked under two spellings.
public enum IPAddress: Hashable, Sendable, CustomStringConvertible {
    /// An IPv4 address in host byte order (`127.0.0.1` is `0x7f00_0001`).
    case v4(UInt32)
    /// An IPv6 address as its high and low 64 bits, in host byte order.
    case v6(high: UInt64, low: UInt64)

    /// The IPv4 loopback address, 127.0.0.1.
    public static let loopbackV4 = IPAddress.v4(0x7f00_0001)
    /// The IPv6 loopback address, ::1.
    public static let loopbackV6 = IPAddress.v6(high: 0, low: 1)
    /// The IPv4 wildcard, 0.0.0.0.
    public static let anyV4 = IPAddress.v4(0)
    /// The IPv6 wildcard, ::.
    public static let anyV6 = IPAddress.v6(high: 0, low: 0)

    /// Parses dotted-quad IPv4 or textual IPv6 (with `::` and an embedded IPv4 tail).
    ///
    /// Returns nil for anything else, including IPv6 zone ids (`fe80::1%eth0`).
    public init?(_ text: some StringProtocol) {
        if let v4 = Self.parseV4(Substring(text)) {
            self = .v4(v4)
        } else if let (high, low) = Self.parseV6(Substring(text)) {
            self = .v6(high: high, low: low)
        } else {
            return nil
        }
    }

    /// True for IPv6 addresses.
    public var isIPv6: Bool {
        if case .v6 = self { return true }
        return false
    }

    /// "IPv4" or "IPv6", for messages.
    public var familyName: String { isIPv6 ? "IPv6" : "IPv4" }

    /// True for 0.0.0.0 and ::.
    public var isUnspecified: Bool { self == .anyV4 || self == .anyV6 }

    /// True for 127.0.0.0/8 and ::1 (and 127.0.0.0/8 mapped into IPv6): always this host's own.
    public var isLoopback: Bool {
        switch unmapped {
        case .v4(let value): return value >> 24 == 127
        case .v6(let high, let low): return high == 0 && low == 1
        }
    }

    /// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), else self.
    public var unmapped: IPAddress {
        if case .v6(let high, let low) = self, high == 0, low >> 32 == 0xffff {
            return .v4(UInt32(truncatingIfNeeded: low))
        }
        return self
    }

    /// The address as 4 or 16 bytes in network order.
    public var bytes: [UInt8] {
        switch self {
        case .v4(let value):
            return (0..<4).map { UInt8(truncatingIfNeeded: value >> (24 - 8 * $0)) }
        case .v6(let high, let low):
            return (0..<8).map { UInt8(truncatingIfNeeded: high >> (56 - 8 * $0)) }
                + (0..<8).map { UInt8(truncatingIfNeeded: low >> (56 - 8 * $0)) }
        }
    }

    /// Builds an address from 4 or 16 network-order bytes; nil for any other count.
    public init?(bytes: some Collection<UInt8>) {
        switch bytes.count {
        case 4:
            self = .v4(bytes.reduce(0) { $0 << 8 | UInt32($1) })
        case 16:
            let high = bytes.prefix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            let low = bytes.dropFirst(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
            self = .v6(high: high, low: low)
        default:
            return nil
        }
    }

    public var description: String {
        switch self {
        case .v4(let value):
            return Self.formatV4(value)
        case .v6(let high, let low):
            return Self.formatV6(high: high, low: low)
        }
    }

    private static func formatV4(_ value: UInt32) -> String {
        "\(value >> 24).\((value >> 16) & 0xff).\((value >> 8) & 0xff).\(value & 0xff)"
    }

    private static func formatV6(high: UInt64, low: UInt64) -> String {
        if high == 0, low >> 32 == 0xffff {
            return "::ffff:" + formatV4(UInt32(truncatingIfNeeded: low))
        }
        let groups: [UInt16] = (0..<4).map { UInt16(truncatingIfNeeded: high >> (48 - 16 * $0)) }
            + (0..<4).map { UInt16(truncatingIfNeeded: low >> (48 - 16 * $0)) }
        // RFC 5952: compress the longest run of two or more zero groups (the first one on a tie).
        var bestStart = -1, bestLength = 0, runStart = -1
        for index in 0...8 {
            if index < 8, groups[index] == 0 {
                if runStart < 0 { runStart = index }
            } else if runStart >= 0 {
                if index - runStart > bestLength { bestStart = runStart; bestLength = index - runStart }
                runStart = -1
            }
        }
        let hex = { (range: Range<Int>) in
            groups[range].map { String($0, radix: 16) }.joined(separator: ":")
        }
        guard bestLength >= 2 else { return hex(0..<8) }
        return hex(0..<bestStart) + "::" + hex((bestStart + bestLength)..<8)
    }

    private static func parseV4(_ text: Substring) -> UInt32? {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var value: UInt32 = 0
        for part in parts {
            // Leading zeros are refused: inet_aton reads "010" as octal, which surprises users.
            guard (1...3).contains(part.count), part.allSatisfy(\.isASCIIDigit),
                  part.count == 1 || part.first != "0",
                  let octet = UInt32(part), octet <= 255 else { return nil }
            value = value << 8 | octet
        }
        return value
    }

    private static func parseV6(_ text: Substring) -> (UInt64, UInt64)? {
        guard text.contains(":"), !text.contains("%") else { return nil }
        var head: [UInt16] = []
        var tail: [UInt16] = []
        if let gap = text.firstRange(of: "::") {
            let after = text[gap.upperBound...]
            guard after.firstRange(of: "::") == nil,
                  let first = parseGroups(text[..<gap.lowerBound], allowV4Tail: false),
                  let second = parseGroups(after, allowV4Tail: true),
                  first.count + second.count <= 7 else { return nil }
            head = first
            tail = second
        } else {
            guard let groups = parseGroups(text, allowV4Tail: true), groups.count == 8 else { return nil }
            head = groups
        }
        let groups = head + Array(repeating: 0, count: 8 - head.count - tail.count) + tail
        let high = groups[0..<4].reduce(UInt64(0)) { $0 << 16 | UInt64($1) }
        let low = groups[4..<8].reduce(UInt64(0)) { $0 << 16 | UInt64($1) }
        return (high, low)
    }

    /// Parses colon-separated hex groups; the last may be a dotted IPv4 address (two groups).
    private static func parseGroups(_ text: Substring, allowV4Tail: Bool) -> [UInt16]? {
        if text.isEmpty { return [] }
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        var groups: [UInt16] = []
        for (index, part) in parts.enumerated() {
            if index == parts.count - 1, allowV4Tail, part.contains(".") {
                guard let v4 = parseV4(part) else { return nil }
                groups.append(UInt16(v4 >> 16))
                groups.append(UInt16(v4 & 0xffff))
            } else {
                guard (1...4).contains(part.count), part.allSatisfy(\.isHexDigit),
                      let group = UInt16(part, radix: 16) else { return nil }
                groups.append(group)
            }
        }
        return groups
    }
}

extension Character {
    var isASCIIDigit: Bool { ("0"..."9").contains(self) }
}
