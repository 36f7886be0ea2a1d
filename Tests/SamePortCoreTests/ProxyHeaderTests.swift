import SamePortCore
import Testing

@Suite("PROXY protocol headers: encoding, parsing, and a fuzzed parser")
struct ProxyHeaderTests {
    private func endpoint(_ address: String, _ port: UInt16) -> Endpoint {
        Endpoint(IPAddress(address) ?? .anyV4, port)
    }

    private func addresses(_ source: String, _ sourcePort: UInt16, _ destination: String, _ destinationPort: UInt16) -> ProxyAddresses {
        ProxyAddresses(source: endpoint(source, sourcePort), destination: endpoint(destination, destinationPort))
    }

    private func text(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }

    private static let signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]

    // MARK: Encoding

    @Test("v1 is one line: TCP4, TCP6, UNKNOWN; two families are sent as TCP6 with the IPv4 one mapped")
    func encodeV1() {
        let v4 = ProxyHeader(version: .v1, addresses: addresses("192.0.2.1", 56324, "127.0.0.1", 7000))
        #expect(text(v4.encoded()) == "PROXY TCP4 192.0.2.1 127.0.0.1 56324 7000\r\n")
        let v6 = ProxyHeader(version: .v1, addresses: addresses("2001:db8::1", 1, "::1", 65535))
        #expect(text(v6.encoded()) == "PROXY TCP6 2001:db8::1 ::1 1 65535\r\n")
        #expect(text(ProxyHeader(version: .v1, addresses: nil).encoded()) == "PROXY UNKNOWN\r\n")
        let mixed = ProxyHeader(version: .v1, addresses: addresses("2001:db8::1", 1, "127.0.0.1", 2))
        #expect(text(mixed.encoded()) == "PROXY TCP6 2001:db8::1 ::ffff:127.0.0.1 1 2\r\n")
        // An IPv4-mapped client of a dual-stack listener is announced as IPv4.
        let mapped = ProxyHeader(version: .v1, addresses: addresses("::ffff:10.0.0.1", 1, "::ffff:127.0.0.1", 2))
        #expect(text(mapped.encoded()) == "PROXY TCP4 10.0.0.1 127.0.0.1 1 2\r\n")
    }

    @Test("v2 is the signature, 0x21 PROXY (0x20 LOCAL), the family, the length and the addresses")
    func encodeV2() {
        let v4 = ProxyHeader(version: .v2, addresses: addresses("192.0.2.1", 0x1234, "127.0.0.1", 7000))
        #expect(v4.encoded() == Self.signature + [0x21, 0x11, 0x00, 12, 192, 0, 2, 1, 127, 0, 0, 1, 0x12, 0x34, 0x1B, 0x58])
        let v6 = ProxyHeader(version: .v2, addresses: addresses("2001:db8::1", 1, "::1", 2)).encoded()
        #expect(v6.count == 16 + 36)
        #expect(Array(v6[12..<16]) == [0x21, 0x21, 0x00, 36])
        #expect(Array(v6[16..<32]) == [0x20, 0x01, 0x0D, 0xB8] + [UInt8](repeating: 0, count: 11) + [1])
        #expect(Array(v6[48..<52]) == [0, 1, 0, 2])
        #expect(ProxyHeader(version: .v2, addresses: nil, isLocal: true).encoded() == Self.signature + [0x20, 0x00, 0x00, 0x00])
        #expect(ProxyHeader(version: .v2, addresses: nil).encoded() == Self.signature + [0x21, 0x00, 0x00, 0x00])
    }

    @Test("Versions parse from v1 and v2 only")
    func versionParsing() throws {
        #expect(try ProxyProtocolVersion(parsing: "v1") == .v1)
        #expect(try ProxyProtocolVersion(parsing: "v2") == .v2)
        #expect(throws: OptionError("invalid PROXY protocol version '2': expected v1 or v2")) { try ProxyProtocolVersion(parsing: "2") }
    }

    // MARK: Parsing

    private static let samples: [ProxyHeader] = [
        ProxyHeader(version: .v1, addresses: ProxyAddresses(source: Endpoint(.v4(0xC000_0201), 56324), destination: Endpoint(.loopbackV4, 7000))),
        ProxyHeader(version: .v1, addresses: ProxyAddresses(source: Endpoint(.v6(high: ~0, low: ~0), 65535), destination: Endpoint(.v6(high: ~0, low: ~0), 65535))),
        ProxyHeader(version: .v1, addresses: nil),
        ProxyHeader(version: .v2, addresses: ProxyAddresses(source: Endpoint(.v4(0x7F00_0009), 40000), destination: Endpoint(.loopbackV4, 7000))),
        ProxyHeader(version: .v2, addresses: ProxyAddresses(source: Endpoint(.v6(high: 0x2001_0db8 << 32, low: 7), 1), destination: Endpoint(.loopbackV6, 0))),
        ProxyHeader(version: .v2, addresses: nil, isLocal: true),
        ProxyHeader(version: .v2, addresses: nil),
    ]

    @Test("What is encoded parses back, with its exact length, whatever follows it; every shorter prefix needs more")
    func roundTrip() {
        for header in Self.samples {
            let bytes = header.encoded()
            #expect(ProxyHeaderParser.parse(bytes) == .header(header, length: bytes.count))
            #expect(ProxyHeaderParser.parse(bytes + Array("GET / HTTP/1.1\r\n\r\n".utf8)) == .header(header, length: bytes.count))
            for count in 0..<bytes.count {
                #expect(ProxyHeaderParser.parse(Array(bytes.prefix(count))) == .needMore, "prefix of \(count) of \(bytes)")
            }
        }
        // The longest v1 line the specification allows (107 bytes) is taken; UNKNOWN ignores the rest.
        let longest = "PROXY UNKNOWN " + String(repeating: "x", count: 107 - 16) + "\r\n"
        #expect(longest.utf8.count == 107)
        #expect(ProxyHeaderParser.parse(Array(longest.utf8)) == .header(ProxyHeader(version: .v1, addresses: nil), length: 107))
    }

    @Test("v2 TLVs are skipped; LOCAL and AF_UNSPEC announce no addresses")
    func v2Variants() {
        // IPv4 addresses, then a NOOP TLV of 3 bytes and a unique-id TLV of 0 bytes.
        let tlvs: [UInt8] = [0x04, 0x00, 0x03, 1, 2, 3, 0x05, 0x00, 0x00]
        let base = ProxyHeader(version: .v2, addresses: addresses("127.0.0.9", 1, "127.0.0.1", 2)).encoded()
        var withTLVs = Array(base[0..<14]) + [0x00, UInt8(12 + tlvs.count)] + Array(base[16...]) + tlvs
        #expect(ProxyHeaderParser.parse(withTLVs + [0xAA]) == .header(ProxyHeader(version: .v2, addresses: addresses("127.0.0.9", 1, "127.0.0.1", 2)), length: withTLVs.count))
        // A LOCAL header with IPv4 addresses: they are ignored.
        withTLVs[12] = 0x20
        #expect(ProxyHeaderParser.parse(withTLVs) == .header(ProxyHeader(version: .v2, addresses: nil, isLocal: true), length: withTLVs.count))
        // PROXY with AF_UNSPEC and 5 bytes to skip.
        let unspec = Self.signature + [0x21, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5]
        #expect(ProxyHeaderParser.parse(unspec) == .header(ProxyHeader(version: .v2, addresses: nil), length: unspec.count))
    }

    private func reason(_ bytes: [UInt8]) -> String? {
        if case .invalid(let reason) = ProxyHeaderParser.parse(bytes) { return reason }
        return nil
    }

    private func reason(_ line: String) -> String? { reason(Array(line.utf8)) }

    @Test("Malformed v1 headers are refused with the problem named")
    func malformedV1() {
        #expect(reason("GET / HTTP/1.1\r\n") == "not a PROXY protocol header: it begins with neither \"PROXY \" (v1) nor the v2 signature")
        #expect(reason("PROX\r") == "not a PROXY protocol header: it begins with neither \"PROXY \" (v1) nor the v2 signature")
        #expect(reason("PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n") == "malformed PROXY v1 header: unknown protocol 'TCP5' (expected TCP4, TCP6 or UNKNOWN)")
        #expect(reason("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n") == "malformed PROXY v1 header: expected 'TCP4 SOURCE DESTINATION SOURCE-PORT DESTINATION-PORT' separated by single spaces")
        #expect(reason("PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n") == "malformed PROXY v1 header: expected 'TCP4 SOURCE DESTINATION SOURCE-PORT DESTINATION-PORT' separated by single spaces")
        #expect(reason("PROXY TCP4 ::1 5.6.7.8 1 2\r\n") == "malformed PROXY v1 header: the source '::1' is not an IPv4 address")
        #expect(reason("PROXY TCP6 ::1 5.6.7.8 1 2\r\n") == "malformed PROXY v1 header: the destination '5.6.7.8' is not an IPv6 address")
        #expect(reason("PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n") == "malformed PROXY v1 header: the source port '65536' is not a number from 0 to 65535")
        #expect(reason("PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n") == "malformed PROXY v1 header: the destination port '+2' is not a number from 0 to 65535")
        #expect(reason("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n") == "malformed PROXY v1 header: a line that ends with LF instead of CRLF")
        #expect(reason("PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n") == "malformed PROXY v1 header: a CR not followed by LF")
        #expect(reason("PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n") == "malformed PROXY v1 header: a byte that is not printable ASCII (0x09)")
        // No CRLF within 107 bytes: oversized, decided at the 107th byte.
        let long = "PROXY UNKNOWN " + String(repeating: "x", count: 93)
        #expect(long.utf8.count == 107)
        #expect(ProxyHeaderParser.parse(Array(long.utf8.dropLast())) == .needMore)
        #expect(reason(long) == "oversized PROXY v1 header: no CRLF within 107 bytes")
        #expect(reason(String(long.dropLast()) + "\r") == "oversized PROXY v1 header: no CRLF within 107 bytes")
    }

    @Test("Malformed and oversized v2 headers are refused as soon as the bytes show it")
    func malformedV2() {
        let signature = Self.signature
        #expect(reason(signature + [0x11]) == "malformed PROXY v2 header: version 1, expected 2")
        #expect(reason(signature + [0x22]) == "malformed PROXY v2 header: unknown command 2 (expected 0 LOCAL or 1 PROXY)")
        #expect(reason(signature + [0x21, 0x12, 0x00, 0x0C] + [UInt8](repeating: 0, count: 12)) == "malformed PROXY v2 header: it announces UDP; a TCP relay takes TCP over IPv4 or IPv6")
        #expect(reason(signature + [0x21, 0x31, 0x00, 0x00]) == "malformed PROXY v2 header: it announces a UNIX socket; a TCP relay takes TCP over IPv4 or IPv6")
        #expect(reason(signature + [0x21, 0x41, 0x00, 0x00]) == "malformed PROXY v2 header: unknown address family and protocol 0x41")
        #expect(reason(signature + [0x21, 0x11, 0x00, 0x0B] + [UInt8](repeating: 0, count: 11)) == "malformed PROXY v2 header: 11 bytes cannot hold the IPv4 addresses (12)")
        #expect(reason(signature + [0x21, 0x11, 0x00, 0x0E] + [UInt8](repeating: 0, count: 14)) == "malformed PROXY v2 header: a TLV is cut short by the header's end")
        #expect(reason(signature + [0x21, 0x11, 0x00, 0x0F] + [UInt8](repeating: 0, count: 12) + [0x04, 0x00, 0x01]) == "malformed PROXY v2 header: a TLV of 1 bytes overruns the header's end")
        // Oversized: refused from its 16th byte, without waiting for the 4097 it states.
        #expect(reason(signature + [0x21, 0x11, 0x10, 0x01]) == "oversized PROXY v2 header: it states 4097 bytes of addresses and TLVs, sameport takes at most 4096")
        #expect(reason(signature + [0x21, 0x11, 0xFF, 0xFF]) == "oversized PROXY v2 header: it states 65535 bytes of addresses and TLVs, sameport takes at most 4096")
        // The largest it takes.
        let largest = signature + [0x21, 0x00, 0x10, 0x00] + [UInt8](repeating: 7, count: 4096)
        #expect(ProxyHeaderParser.parse(Array(largest.dropLast())) == .needMore)
        #expect(ProxyHeaderParser.parse(largest) == .header(ProxyHeader(version: .v2, addresses: nil), length: ProxyHeaderParser.maximumLength))
        // A corrupted signature.
        var corrupted = signature
        corrupted[7] = 0x52
        #expect(reason(corrupted) == "not a PROXY protocol header: it begins with neither \"PROXY \" (v1) nor the v2 signature")
    }

    // MARK: Fuzzing

    /// xorshift64*: the same mutations on every run.
    private struct SeededGenerator: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state ^= state >> 12
            state ^= state << 25
            state ^= state >> 27
            return state &* 2_685_821_657_736_338_717
        }
    }

    /// Valid headers of every kind, mutated, to start from.
    private static func seeds() -> [[UInt8]] {
        var seeds = samples.map { $0.encoded() }
        let withTLVs = Self.signature + [0x21, 0x11, 0x00, 21] + [127, 0, 0, 9, 127, 0, 0, 1, 0x9C, 0x40, 0x1B, 0x58]
            + [0x04, 0x00, 0x03, 1, 2, 3, 0x05, 0x00, 0x00]
        seeds.append(withTLVs)
        seeds.append(Array("PROXY UNKNOWN whatever follows\r\n".utf8))
        return seeds
    }

    private static func mutate(_ bytes: inout [UInt8], using random: inout SeededGenerator) {
        let interesting: [UInt8] = [0x00, 0x0A, 0x0D, 0x20, 0x21, 0x11, 0xFF, 0x30, 0x39, 0x3A, 0x2E, 0x7F, 0x80]
        switch Int.random(in: 0..<8, using: &random) {
        case 0 where !bytes.isEmpty:  // flip a bit
            bytes[Int.random(in: 0..<bytes.count, using: &random)] ^= 1 << UInt8.random(in: 0..<8, using: &random)
        case 1 where !bytes.isEmpty:  // an interesting byte
            bytes[Int.random(in: 0..<bytes.count, using: &random)] = interesting.randomElement(using: &random) ?? 0
        case 2:  // insert a byte
            bytes.insert(UInt8.random(in: 0...255, using: &random), at: Int.random(in: 0...bytes.count, using: &random))
        case 3 where !bytes.isEmpty:  // delete a byte
            bytes.remove(at: Int.random(in: 0..<bytes.count, using: &random))
        case 4 where !bytes.isEmpty:  // cut short
            bytes.removeLast(Int.random(in: 0...bytes.count, using: &random))
        case 5 where bytes.count > 16:  // a v2 length, anything
            bytes[14] = UInt8.random(in: 0...255, using: &random)
            bytes[15] = UInt8.random(in: 0...255, using: &random)
        case 6 where !bytes.isEmpty:  // repeat a stretch
            let start = Int.random(in: 0..<bytes.count, using: &random)
            let end = Int.random(in: start...min(bytes.count, start + 40), using: &random)
            bytes.insert(contentsOf: bytes[start..<end], at: end)
        default:  // append bytes (CRs and LFs among them)
            for _ in 0..<Int.random(in: 1...8, using: &random) {
                bytes.append(Bool.random(using: &random) ? interesting.randomElement(using: &random) ?? 0 : UInt8.random(in: 0...255, using: &random))
            }
        }
    }

    @Test("Fuzz: 5,000 mutations of valid headers, fed in random pieces: never a crash, needMore only below the bound, a decision never changes with more bytes, and a header never reaches past itself")
    func fuzz() {
        var random = SeededGenerator(state: 0x5A3E_F00D_1234_5678)
        let seeds = Self.seeds()
        var outcomes = (headers: 0, invalid: 0, needMore: 0)
        for round in 0..<5000 {
            var bytes = seeds[round % seeds.count]
            for _ in 0..<Int.random(in: 1...4, using: &random) { Self.mutate(&bytes, using: &random) }
            // The client's own bytes after the header.
            let tail = (0..<Int.random(in: 0...32, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) }
            let input = bytes + tail
            var received = 0
            var decided: ProxyHeaderParse?
            while received < input.count {
                received = min(input.count, received + Int.random(in: 1...24, using: &random))
                let prefix = Array(input[0..<received])
                let answer = ProxyHeaderParser.parse(prefix)
                switch answer {
                case .needMore:
                    #expect(decided == nil, "needMore after a decision, round \(round): \(prefix)")
                    #expect(received < ProxyHeaderParser.maximumLength)
                case .header(_, let length):
                    #expect(length > 0 && length <= received && length <= ProxyHeaderParser.maximumLength, "round \(round): \(prefix)")
                    // Decided by the header's own bytes alone: nothing past it was needed.
                    #expect(ProxyHeaderParser.parse(Array(prefix[0..<length])) == answer, "round \(round): \(prefix)")
                    if let decided { #expect(decided == answer, "round \(round): \(prefix)") }
                    decided = answer
                case .invalid(let reason):
                    #expect(!reason.isEmpty)
                    if let decided { #expect(decided == answer, "round \(round): \(prefix)") }
                    decided = answer
                }
            }
            switch decided {
            case .header: outcomes.headers += 1
            case .invalid: outcomes.invalid += 1
            case .needMore, nil: outcomes.needMore += 1
            }
        }
        // The mutations reach every answer.
        #expect(outcomes.headers > 100 && outcomes.invalid > 1000 && outcomes.needMore > 100, "\(outcomes)")
    }
}
