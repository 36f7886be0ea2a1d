/// A host and port as a user writes it: `1.2.3.4:80`, `[::1]:80`, `*:80`, `example.org:80`.
public struct HostPort: Hashable, Sendable, CustomStringConvertible {
    /// What stands before the port.
    public enum Host: Hashable, Sendable {
        /// `*`: every local address.
        case any
        /// A literal IPv4 or IPv6 address.
        case ip(IPAddress)
        /// A DNS name, resolved when the relay starts.
        case name(String)
    }

    public var host: Host
    public var port: UInt16

    public init(host: Host, port: UInt16) {
        self.host = host
        self.port = port
    }

    /// Parses `HOST:PORT`; the error text says what is wrong and how the value should look.
    public init(parsing text: String) throws(AddressError) {
        let (hostText, portText) = try Self.split(text)
        guard !portText.isEmpty else { throw AddressError(text, "the port is missing") }
        guard portText.allSatisfy(\.isASCIIDigit), let port = UInt16(portText) else {
            throw AddressError(text, "the port '\(portText)' is not a number from 0 to 65535")
        }
        self.port = port
        if hostText == "*" {
            host = .any
        } else if let address = IPAddress(hostText) {
            host = .ip(address)
        } else if Self.isValidHostName(hostText) {
            host = .name(String(hostText))
        } else {
            throw AddressError(text, "'\(hostText)' is neither an IP address nor a host name")
        }
    }

    /// The endpoint when the host is a literal address.
    public var endpoint: Endpoint? {
        if case .ip(let address) = host { return Endpoint(address, port) }
        return nil
    }

    /// True when a listener asked for this address and one bound to `bound` would take the same
    /// clients: the same port, and the same address or a wildcard on either side.
    public func overlaps(_ bound: Endpoint) -> Bool {
        guard bound.port == port else { return false }
        switch host {
        case .any: return true
        case .name: return false  // a name never listens
        case .ip(let address): return bound.address.isUnspecified || bound.address.unmapped == address.unmapped
        }
    }

    public var description: String {
        switch host {
        case .any: return "*:\(port)"
        case .ip(let address): return Endpoint(address, port).description
        case .name(let name): return "\(name):\(port)"
        }
    }

    private static func split(_ text: String) throws(AddressError) -> (Substring, Substring) {
        if text.isEmpty { throw AddressError(text, "it is empty") }
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else {
                throw AddressError(text, "the '[' of an IPv6 address is not closed")
            }
            let inside = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.first == ":" else { throw AddressError(text, "the port is missing") }
            guard IPAddress(inside)?.isIPv6 == true else {
                throw AddressError(text, "'\(inside)' is not an IPv6 address")
            }
            return (inside, rest.dropFirst())
        }
        let colons = text.filter { $0 == ":" }.count
        if colons > 1 {
            throw AddressError(text, "an IPv6 address needs brackets, as in [::1]:8080")
        }
        guard let colon = text.lastIndex(of: ":") else {
            throw AddressError(text, "the port is missing")
        }
        let host = text[..<colon]
        guard !host.isEmpty else { throw AddressError(text, "the host is missing (use *:PORT for every address)") }
        return (host, text[text.index(after: colon)...])
    }

    private static func isValidHostName(_ text: Substring) -> Bool {
        guard !text.isEmpty, text.count <= 253 else { return false }
        // A name made only of digits and dots is a mistyped IPv4 address, not a host name.
        if text.allSatisfy({ $0.isASCIIDigit || $0 == "." }) { return false }
        return text.split(separator: ".", omittingEmptySubsequences: false).allSatisfy { label in
            (1...63).contains(label.count) && label.first != "-" && label.last != "-"
                && label.allSatisfy { $0.isASCII && ($0.isLetter || $0.isASCIIDigit || $0 == "-" || $0 == "_") }
        }
    }
}

/// A malformed address, with the text given and what is wrong with it.
public struct AddressError: Error, Equatable, Sendable, CustomStringConvertible {
    public var text: String
    public var reason: String

    public init(_ text: String, _ reason: String) {
        self.text = text
        self.reason = reason
    }

    public var description: String {
        "invalid address '\(text)': \(reason); expected IP:PORT, [IPv6]:PORT, *:PORT or HOST:PORT"
    }
}
