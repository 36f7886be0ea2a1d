/// One entry of a `destinations` allow list: an address block and, optionally, a port range.
///
/// Written `CIDR` (any port), `CIDR:PORT` or `CIDR:FIRST-LAST`; an IPv6 block with a port is in
/// brackets: `10.0.0.0/8`, `192.0.2.1:443`, `10.0.0.0/8:80-90`, `2001:db8::/32`,
/// `[2001:db8::]/32:80-90`, `[2001:db8::1]:443`.
public struct DestinationRule: Hashable, Sendable, CustomStringConvertible {
    public var block: CIDR
    /// The ports allowed; nil: every port.
    public var ports: ClosedRange<UInt16>?

    public init(block: CIDR, ports: ClosedRange<UInt16>? = nil) {
        self.block = block
        self.ports = ports
    }

    /// Parses one entry; the error names the value and shows the accepted forms.
    public init(parsing text: String) throws(OptionError) {
        let forms = "expected CIDR[:PORTS] such as 10.0.0.0/8, 192.0.2.1:443, 10.0.0.0/8:80-90 or [2001:db8::]/32:443"
        var blockText = Substring(text)
        var portText: Substring?
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else {
                throw OptionError("invalid destination '\(text)': the ']' after the IPv6 address is missing; \(forms)")
            }
            blockText = text[text.index(after: text.startIndex)..<close]
            var rest = text[text.index(after: close)...]
            // `[2001:db8::]/32:443`: the prefix length follows the bracket.
            if rest.hasPrefix("/") {
                let end = rest.firstIndex(of: ":") ?? rest.endIndex
                blockText = Substring(String(blockText) + rest[..<end])
                rest = rest[end...]
            }
            if !rest.isEmpty {
                guard rest.hasPrefix(":") else {
                    throw OptionError("invalid destination '\(text)': unexpected '\(rest)' after the address; \(forms)")
                }
                portText = rest.dropFirst()
            }
        } else if text.filter({ $0 == ":" }).count == 1, let colon = text.firstIndex(of: ":") {
            // One colon: IPv4 with ports. Several: a bare IPv6 block, every port.
            blockText = text[..<colon]
            portText = text[text.index(after: colon)...]
        }
        let block: CIDR
        do {
            block = try CIDR(parsing: String(blockText))
        } catch {
            // The CIDR's own reason, without its "invalid CIDR '…': " opening.
            let prefix = "invalid CIDR '\(blockText)': "
            let reason = error.message.hasPrefix(prefix) ? String(error.message.dropFirst(prefix.count)) : error.message
            throw OptionError("invalid destination '\(text)': \(reason)")
        }
        self.block = block
        guard let portText else { return }
        let bounds = portText.split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false)
        let numbers = bounds.map { bound -> UInt16? in
            guard !bound.isEmpty, bound.allSatisfy(\.isASCIIDigit), let port = UInt16(bound), port > 0 else { return nil }
            return port
        }
        guard let first = numbers.first ?? nil, let last = numbers.last ?? nil else {
            throw OptionError("invalid destination '\(text)': the ports '\(portText)' are not a port from 1 to 65535 or a range FIRST-LAST; \(forms)")
        }
        guard first <= last else {
            throw OptionError("invalid destination '\(text)': the port range \(first)-\(last) is backwards; write \(last)-\(first)")
        }
        ports = first...last
    }

    /// Whether `destination` is in this block and port range.
    public func contains(_ destination: Endpoint) -> Bool {
        guard block.contains(destination.address) else { return false }
        return ports.map { $0.contains(destination.port) } ?? true
    }

    public var description: String {
        guard let ports else { return block.description }
        let portText = ports.lowerBound == ports.upperBound ? "\(ports.lowerBound)" : "\(ports.lowerBound)-\(ports.upperBound)"
        return block.address.isIPv6 ? "[\(block.address)]/\(block.prefixLength):\(portText)" : "\(block):\(portText)"
    }
}

/// Where a relay with `upstream = "original"` may forward: the destinations its clients dialled
/// that fall in one of its rules. Empty allows nothing: a transparent relay must never become an
/// open proxy by accident, so an empty list is refused at start-up (`RelaySpec.problems()`), and
/// allowing everything is written out (`0.0.0.0/0`, `::/0`).
public struct Destinations: Hashable, Sendable, CustomStringConvertible {
    public var rules: [DestinationRule]

    public init(_ rules: [DestinationRule] = []) {
        self.rules = rules
    }

    public var isEmpty: Bool { rules.isEmpty }

    /// Why `destination` is refused, or nil when it is allowed.
    public func refusal(of destination: Endpoint) -> String? {
        let destination = destination.unmapped
        if rules.contains(where: { $0.contains(destination) }) { return nil }
        return "the original destination \(destination) is in no destinations entry (\(description))"
    }

    public var description: String {
        rules.isEmpty ? "none" : rules.map(\.description).joined(separator: ", ")
    }
}
