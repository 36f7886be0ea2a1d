/// The PROXY protocol (HAProxy's doc/proxy-protocol.txt), versions 1 and 2: a header that a proxy
/// sends before the first byte of its client's, announcing the client's address and the address
/// the client reached, so that the receiver can treat the connection as the client's own.
///
/// - v1 is one line of printable ASCII, `PROXY TCP4 SOURCE DESTINATION SPORT DPORT\r\n` (or TCP6,
///   or `PROXY UNKNOWN...\r\n`), at most 107 bytes with its CRLF (the specification's bound).
/// - v2 is binary: a 12-byte signature, a version-and-command byte, a family-and-protocol byte, a
///   16-bit length, then that many bytes of addresses and optional TLVs. The specification lets the
///   length say up to 65535; sameport takes at most `ProxyHeaderParser.maximumV2Payload` (4096), room
///   for the TLVs that HAProxy, AWS, Azure and GCP send (SSL details, a unique id of up to 128 bytes,
///   endpoint ids), and refuses a longer header as oversized. The receiver re-reads (peeks) a header
///   that arrives in pieces, so the bound also bounds that work.
public enum ProxyProtocolVersion: String, CaseIterable, Hashable, Sendable {
    case v1
    case v2

    /// Parses `v1` or `v2`.
    public init(parsing text: String) throws(OptionError) {
        guard let version = ProxyProtocolVersion(rawValue: text) else {
            throw OptionError("invalid PROXY protocol version '\(text)': expected v1 or v2")
        }
        self = version
    }
}

/// The two addresses a PROXY header announces.
public struct ProxyAddresses: Hashable, Sendable {
    /// The client: where the connection came from.
    public var source: Endpoint
    /// The address the client connected to.
    public var destination: Endpoint

    public init(source: Endpoint, destination: Endpoint) {
        self.source = source
        self.destination = destination
    }
}

/// One PROXY protocol header, as sent or as read.
public struct ProxyHeader: Hashable, Sendable {
    public var version: ProxyProtocolVersion
    /// The announced addresses; nil when the header announces none (v1 `UNKNOWN`, v2 `LOCAL` or
    /// AF_UNSPEC): the receiver then keeps the connection's own addresses.
    public var addresses: ProxyAddresses?
    /// v2's LOCAL command: a connection the proxy made on its own (a health check), not for a
    /// client. Its addresses are ignored.
    public var isLocal: Bool

    public init(version: ProxyProtocolVersion, addresses: ProxyAddresses?, isLocal: Bool = false) {
        self.version = version
        self.addresses = addresses
        self.isLocal = isLocal
    }

    /// v2's 12-byte signature.
    public static let v2Signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]

    /// The header as bytes on the wire.
    ///
    /// Addresses of two families (an IPv6 client of a relay that listens on IPv4, which cannot
    /// happen with one socket, but may with an announced client) are both sent as IPv6, the IPv4
    /// one mapped (`::ffff:a.b.c.d`): the header has one family. No addresses: v1 `UNKNOWN`, v2
    /// `LOCAL` when `isLocal`, else PROXY with AF_UNSPEC. v2 is sent without TLVs.
    public func encoded() -> [UInt8] {
        let pair = addresses.map(Self.oneFamily)
        switch version {
        case .v1:
            guard let (source, destination) = pair else { return Array("PROXY UNKNOWN\r\n".utf8) }
            let family = source.address.isIPv6 ? "TCP6" : "TCP4"
            return Array("PROXY \(family) \(source.address) \(destination.address) \(source.port) \(destination.port)\r\n".utf8)
        case .v2:
            var bytes = Self.v2Signature
            bytes.append(isLocal ? 0x20 : 0x21)
            guard let (source, destination) = pair, !isLocal else {
                bytes += [0x00, 0x00, 0x00]
                return bytes
            }
            let isIPv6 = source.address.isIPv6
            let length = isIPv6 ? 36 : 12
            bytes += [isIPv6 ? 0x21 : 0x11, 0x00, UInt8(length)]
            bytes += source.address.bytes + destination.address.bytes
            bytes += [UInt8(source.port >> 8), UInt8(source.port & 0xff), UInt8(destination.port >> 8), UInt8(destination.port & 0xff)]
            return bytes
        }
    }

    /// Both endpoints of one family: IPv4 when both are (mapped or not), else IPv6.
    private static func oneFamily(_ addresses: ProxyAddresses) -> (Endpoint, Endpoint) {
        let source = addresses.source.unmapped, destination = addresses.destination.unmapped
        guard source.address.isIPv6 != destination.address.isIPv6 else { return (source, destination) }
        return (source.mappedToIPv6, destination.mappedToIPv6)
    }
}

extension Endpoint {
    /// An IPv4 endpoint as its IPv4-mapped IPv6 form; an IPv6 one unchanged.
    var mappedToIPv6: Endpoint {
        guard case .v4(let value) = address else { return self }
        return Endpoint(.v6(high: 0, low: 0xffff_0000_0000 | UInt64(value)), port)
    }
}

/// What `ProxyHeaderParser.parse` makes of the bytes received so far.
public enum ProxyHeaderParse: Hashable, Sendable {
    /// A prefix of a header that may still be valid: wait for more bytes.
    case needMore
    /// A whole header, which is the first `length` bytes; anything after it is the client's.
    case header(ProxyHeader, length: Int)
    /// Not a header, or one sameport refuses; `reason` is a phrase for a log line.
    case invalid(reason: String)
}

/// Reads a PROXY protocol header, v1 or v2, from the start of a connection's bytes.
///
/// Incremental without state: call `parse` with every byte received so far, each time more
/// arrive. It answers `needMore` only while the bytes are a prefix of an acceptable header and
/// shorter than `maximumLength`, so a receiver never needs to hold more than that; it never looks
/// past the header it answers, and refuses as early as the bytes allow.
public enum ProxyHeaderParser {
    /// v1's bound, with its CRLF (the specification's).
    public static let maximumV1Length = 107
    /// The most bytes of addresses and TLVs a v2 header may state (see `ProxyProtocolVersion`).
    public static let maximumV2Payload = 4096
    /// The most bytes a receiver ever needs to see to decide.
    public static let maximumLength = max(maximumV1Length, 16 + maximumV2Payload)

    private static let v1Prefix = Array("PROXY ".utf8)
    private static let carriageReturn: UInt8 = 0x0D
    private static let lineFeed: UInt8 = 0x0A

    /// Parses `bytes`, everything received so far.
    public static func parse(_ bytes: [UInt8]) -> ProxyHeaderParse {
        bytes.withUnsafeBytes { parse($0) }
    }

    /// Parses `bytes`, everything received so far.
    public static func parse(_ bytes: UnsafeRawBufferPointer) -> ProxyHeaderParse {
        guard let first = bytes.first else { return .needMore }
        let (prefix, isV2) = first == ProxyHeader.v2Signature[0] ? (ProxyHeader.v2Signature, true) : (v1Prefix, false)
        for index in 0..<min(bytes.count, prefix.count) where bytes[index] != prefix[index] {
            return .invalid(reason: "not a PROXY protocol header: it begins with neither \"PROXY \" (v1) nor the v2 signature")
        }
        guard bytes.count >= prefix.count else { return .needMore }
        return isV2 ? parseV2(bytes) : parseV1(bytes)
    }

    // MARK: v1

    private static func parseV1(_ bytes: UnsafeRawBufferPointer) -> ProxyHeaderParse {
        // Find the CRLF within the bound; every byte before it must be printable ASCII.
        var lineEnd: Int?
        for index in v1Prefix.count..<min(bytes.count, maximumV1Length) {
            let byte = bytes[index]
            if byte == carriageReturn {
                // A CRLF that would end past the bound: no need to wait for the LF.
                if index + 2 > maximumV1Length { return oversizedV1 }
                guard index + 1 < bytes.count else { return .needMore }
                guard bytes[index + 1] == lineFeed else {
                    return malformedV1("a CR not followed by LF")
                }
                lineEnd = index
                break
            }
            guard (0x20...0x7E).contains(byte) else {
                return malformedV1(byte == lineFeed ? "a line that ends with LF instead of CRLF" : "a byte that is not printable ASCII (0x\(hex(byte)))")
            }
        }
        guard let lineEnd else {
            return bytes.count >= maximumV1Length ? oversizedV1 : .needMore
        }
        let line = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[v1Prefix.count..<lineEnd]), as: UTF8.self)
        let fields = line.split(separator: " ", omittingEmptySubsequences: false)
        let length = lineEnd + 2
        switch fields[0] {
        case "UNKNOWN":
            // The rest of the line is to be ignored (the specification).
            return .header(ProxyHeader(version: .v1, addresses: nil), length: length)
        case "TCP4", "TCP6":
            let isIPv6 = fields[0] == "TCP6"
            guard fields.count == 5 else {
                return malformedV1("expected '\(fields[0]) SOURCE DESTINATION SOURCE-PORT DESTINATION-PORT' separated by single spaces")
            }
            let family = isIPv6 ? "IPv6" : "IPv4"
            guard let source = IPAddress(fields[1]), source.isIPv6 == isIPv6 else {
                return malformedV1("the source '\(shown(fields[1]))' is not an \(family) address")
            }
            guard let destination = IPAddress(fields[2]), destination.isIPv6 == isIPv6 else {
                return malformedV1("the destination '\(shown(fields[2]))' is not an \(family) address")
            }
            guard let sourcePort = port(fields[3]) else {
                return malformedV1("the source port '\(shown(fields[3]))' is not a number from 0 to 65535")
            }
            guard let destinationPort = port(fields[4]) else {
                return malformedV1("the destination port '\(shown(fields[4]))' is not a number from 0 to 65535")
            }
            let addresses = ProxyAddresses(source: Endpoint(source, sourcePort), destination: Endpoint(destination, destinationPort))
            return .header(ProxyHeader(version: .v1, addresses: addresses), length: length)
        default:
            return malformedV1("unknown protocol '\(shown(fields[0]))' (expected TCP4, TCP6 or UNKNOWN)")
        }
    }

    private static var oversizedV1: ProxyHeaderParse {
        .invalid(reason: "oversized PROXY v1 header: no CRLF within \(maximumV1Length) bytes")
    }

    private static func malformedV1(_ what: String) -> ProxyHeaderParse {
        .invalid(reason: "malformed PROXY v1 header: \(what)")
    }

    /// A port: 1 to 5 decimal digits, at most 65535.
    private static func port(_ text: Substring) -> UInt16? {
        guard (1...5).contains(text.utf8.count), text.utf8.allSatisfy({ (0x30...0x39).contains($0) }) else { return nil }
        return UInt16(text)
    }

    /// A field of a refused header as a log line shows it: printable already, cut short.
    private static func shown(_ text: Substring) -> String {
        text.count <= 40 ? String(text) : String(text.prefix(40)) + "..."
    }

    // MARK: v2

    private static func parseV2(_ bytes: UnsafeRawBufferPointer) -> ProxyHeaderParse {
        let signature = ProxyHeader.v2Signature.count
        // Each byte is judged as soon as it is there.
        guard bytes.count > signature else { return .needMore }
        let versionAndCommand = bytes[signature]
        guard versionAndCommand >> 4 == 2 else {
            return malformedV2("version \(versionAndCommand >> 4), expected 2")
        }
        let command = versionAndCommand & 0x0F
        guard command <= 1 else {
            return malformedV2("unknown command \(command) (expected 0 LOCAL or 1 PROXY)")
        }
        let isLocal = command == 0
        guard bytes.count >= signature + 4 else { return .needMore }
        let familyAndProtocol = bytes[signature + 1]
        let payload = Int(bytes[signature + 2]) << 8 | Int(bytes[signature + 3])
        guard payload <= maximumV2Payload else {
            return .invalid(reason: "oversized PROXY v2 header: it states \(payload) bytes of addresses and TLVs, sameport takes at most \(maximumV2Payload)")
        }
        let total = signature + 4 + payload
        guard bytes.count >= total else { return .needMore }
        if isLocal {
            // The addresses (if any) and TLVs are skipped: the receiver keeps the connection's own.
            return .header(ProxyHeader(version: .v2, addresses: nil, isLocal: true), length: total)
        }
        let addressLength: Int
        switch (familyAndProtocol >> 4, familyAndProtocol & 0x0F) {
        case (0, _):
            // AF_UNSPEC: an unknown or unsupported protocol; the connection's own addresses stand.
            return .header(ProxyHeader(version: .v2, addresses: nil), length: total)
        case (1, 1): addressLength = 12
        case (2, 1): addressLength = 36
        case (3, _):
            return malformedV2("it announces a UNIX socket; a TCP relay takes TCP over IPv4 or IPv6")
        case (1, 2), (2, 2):
            return malformedV2("it announces UDP; a TCP relay takes TCP over IPv4 or IPv6")
        default:
            return malformedV2("unknown address family and protocol 0x\(hex(familyAndProtocol))")
        }
        guard payload >= addressLength else {
            return malformedV2("\(payload) bytes cannot hold the \(addressLength == 12 ? "IPv4" : "IPv6") addresses (\(addressLength))")
        }
        let start = signature + 4
        let size = addressLength == 12 ? 4 : 16
        let source = UnsafeRawBufferPointer(rebasing: bytes[start..<(start + size)])
        let destination = UnsafeRawBufferPointer(rebasing: bytes[(start + size)..<(start + 2 * size)])
        let ports = start + 2 * size
        guard let sourceAddress = IPAddress(bytes: source), let destinationAddress = IPAddress(bytes: destination) else {
            return malformedV2("unreadable addresses")  // cannot happen: 4 or 16 bytes
        }
        let sourcePort = UInt16(bytes[ports]) << 8 | UInt16(bytes[ports + 1])
        let destinationPort = UInt16(bytes[ports + 2]) << 8 | UInt16(bytes[ports + 3])
        // TLVs (type, 16-bit length, value) follow: skipped, but they must fill the rest exactly.
        var offset = start + addressLength
        while offset < total {
            guard total - offset >= 3 else { return malformedV2("a TLV is cut short by the header's end") }
            let valueLength = Int(bytes[offset + 1]) << 8 | Int(bytes[offset + 2])
            guard valueLength <= total - offset - 3 else { return malformedV2("a TLV of \(valueLength) bytes overruns the header's end") }
            offset += 3 + valueLength
        }
        let addresses = ProxyAddresses(
            source: Endpoint(sourceAddress, sourcePort), destination: Endpoint(destinationAddress, destinationPort))
        return .header(ProxyHeader(version: .v2, addresses: addresses), length: total)
    }

    private static func malformedV2(_ what: String) -> ProxyHeaderParse {
        .invalid(reason: "malformed PROXY v2 header: \(what)")
    }

    private static func hex(_ byte: UInt8) -> String {
        let digits = String(byte, radix: 16, uppercase: true)
        return digits.count == 1 ? "0" + digits : digits
    }
}
