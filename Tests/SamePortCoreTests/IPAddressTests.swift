import SamePortCore
import Testing

@Suite("IPAddress")
struct IPAddressTests {
    // MARK: IPv4

    @Test(
        "IPv4 parses to the host-order value and prints back unchanged",
        arguments: [
            ("127.0.0.1", UInt32(0x7f00_0001)),
            ("0.0.0.0", UInt32(0)),
            ("255.255.255.255", UInt32.max),
            ("10.0.255.1", UInt32(0x0a00_ff01)),
            ("1.2.3.4", UInt32(0x0102_0304)),
        ]
    )
    func ipv4RoundTrip(text: String, value: UInt32) throws {
        let address = try #require(IPAddress(text))
        #expect(address == .v4(value))
        #expect(!address.isIPv6)
        #expect(address.description == text)
    }

    @Test(
        "malformed IPv4 is rejected",
        arguments: [
            "256.1.1.1", "1.2.3", "1.2.3.4.5", "01.2.3.4", "1.2.3.00", "", "1..2.3", "1.2.3.",
            "a.b.c.d", "1.2.3.-4", "+1.2.3.4", " 1.2.3.4", "1.2.3.4 ", "1000.1.1.1",
        ]
    )
    func ipv4Rejects(text: String) {
        #expect(IPAddress(text) == nil)
    }

    @Test("the well-known constants")
    func constants() {
        #expect(IPAddress.loopbackV4.description == "127.0.0.1")
        #expect(IPAddress.loopbackV6.description == "::1")
        #expect(IPAddress.anyV4.description == "0.0.0.0")
        #expect(IPAddress.anyV6.description == "::")
        #expect(IPAddress.anyV4.isUnspecified)
        #expect(IPAddress.anyV6.isUnspecified)
        #expect(!IPAddress.loopbackV4.isUnspecified)
        #expect(!IPAddress.loopbackV6.isUnspecified)
        #expect(IPAddress.loopbackV6.isIPv6)
        #expect(!IPAddress.loopbackV4.isIPv6)
    }

    // MARK: IPv6

    @Test(
        "IPv6 prints in RFC 5952 canonical form",
        arguments: [
            ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
            ("::", "::"),
            ("0:0:0:0:0:0:0:0", "::"),
            ("::1", "::1"),
            ("0:0:0:0:0:0:0:1", "::1"),
            ("1::", "1::"),
            ("1:0:0:0:0:0:0:0", "1::"),
            // The longest run of zeros is compressed...
            ("1:0:0:2:0:0:0:3", "1:0:0:2::3"),
            ("1:0:0:0:2:0:0:3", "1::2:0:0:3"),
            // ...the first one on a tie...
            ("1:0:0:2:0:0:3:4", "1::2:0:0:3:4"),
            ("1:2:0:0:3:4:0:0", "1:2::3:4:0:0"),
            // ...and never a single zero group.
            ("1:0:2:3:4:5:6:7", "1:0:2:3:4:5:6:7"),
            ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),
            // Leading zeros within a group are dropped, hex is lower case.
            ("2001:0DB8:00AB:000C::0001", "2001:db8:ab:c::1"),
            ("FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            ("fe80::1:2", "fe80::1:2"),
            ("1:2:3:4:5:6:7::", "1:2:3:4:5:6:7:0"),
            ("::2:3:4:5:6:7:8", "0:2:3:4:5:6:7:8"),
        ]
    )
    func ipv6Canonical(text: String, canonical: String) throws {
        let address = try #require(IPAddress(text))
        #expect(address.isIPv6)
        #expect(address.description == canonical)
        // The canonical form parses back to the same address.
        #expect(IPAddress(canonical) == address)
    }

    @Test("IPv6 groups land in the right halves")
    func ipv6Value() throws {
        #expect(IPAddress("2001:db8::1") == .v6(high: 0x2001_0db8_0000_0000, low: 1))
        #expect(IPAddress("1:2:3:4:5:6:7:8") == .v6(high: 0x0001_0002_0003_0004, low: 0x0005_0006_0007_0008))
        #expect(IPAddress("::") == .anyV6)
        #expect(IPAddress("::1") == .loopbackV6)
    }

    @Test("an embedded IPv4 tail round-trips and unmaps to IPv4")
    func ipv4MappedTail() throws {
        let mapped = try #require(IPAddress("::ffff:1.2.3.4"))
        #expect(mapped == .v6(high: 0, low: 0x0000_ffff_0102_0304))
        #expect(mapped.isIPv6)
        #expect(mapped.description == "::ffff:1.2.3.4")
        #expect(mapped.unmapped == .v4(0x0102_0304))
        #expect(mapped.unmapped.description == "1.2.3.4")
        // The same address written with hex groups prints with the dotted tail.
        #expect(IPAddress("::FFFF:0102:0304")?.description == "::ffff:1.2.3.4")
        #expect(IPAddress("0:0:0:0:0:ffff:1.2.3.4") == mapped)
        // Other IPv4 tails are just IPv6 and stay IPv6.
        let tail = try #require(IPAddress("64:ff9b::1.2.3.4"))
        #expect(tail == .v6(high: 0x0064_ff9b_0000_0000, low: 0x0102_0304))
        #expect(tail.unmapped == tail)
    }

    @Test("unmapped leaves non-mapped addresses alone")
    func unmappedIdentity() throws {
        let v4 = try #require(IPAddress("10.1.2.3"))
        #expect(v4.unmapped == v4)
        let v6 = try #require(IPAddress("2001:db8::ffff:1:2"))
        #expect(v6.unmapped == v6)
        #expect(IPAddress.loopbackV6.unmapped == .loopbackV6)
        // ::fffe:... and 1::ffff:... are not IPv4-mapped.
        let notMapped = try #require(IPAddress("::fffe:1.2.3.4"))
        #expect(notMapped.unmapped == notMapped)
        let high = try #require(IPAddress("1::ffff:1.2.3.4"))
        #expect(high.unmapped == high)
    }

    @Test(
        "malformed IPv6 is rejected",
        arguments: [
            ":::", "1::2::3", "fe80::1%eth0", "1:2:3:4:5:6:7:8:9", "1:2:3:4:5:6:7", ":1::", "1:::2",
            "::1:", ":1", "1:", "12345::", "g::1", "1:2:3:4::5:6:7:8", "1:2:3:4:5:6:7:8::",
            "::1.2.3.4:5", "1.2.3.4::", "::ffff:1.2.3", "::ffff:256.1.1.1", "::ffff:01.2.3.4",
            "1:2:3:4:5:6:7:1.2.3.4", "[::1]", ":",
        ]
    )
    func ipv6Rejects(text: String) {
        #expect(IPAddress(text) == nil)
    }

    // MARK: Bytes

    @Test(
        "bytes are in network order and round-trip",
        arguments: ["127.0.0.1", "0.0.0.0", "255.255.255.255", "::", "::1", "2001:db8::1", "::ffff:1.2.3.4",
                    "fe80::aa:bb:cc:dd", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]
    )
    func bytesRoundTrip(text: String) throws {
        let address = try #require(IPAddress(text))
        let bytes = address.bytes
        #expect(bytes.count == (address.isIPv6 ? 16 : 4))
        #expect(IPAddress(bytes: bytes) == address)
    }

    @Test("bytes spell the address in network order")
    func bytesValues() throws {
        #expect(IPAddress.loopbackV4.bytes == [127, 0, 0, 1])
        let v6 = try #require(IPAddress("2001:db8::102:304"))
        #expect(v6.bytes == [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4])
        #expect(IPAddress(bytes: [192, 168, 1, 2])?.description == "192.168.1.2")
        #expect(IPAddress(bytes: [UInt8](repeating: 0, count: 15) + [1]) == .loopbackV6)
    }

    @Test("bytes of any count but 4 or 16 are refused", arguments: [0, 1, 3, 5, 8, 15, 17, 32])
    func bytesWrongCount(count: Int) {
        #expect(IPAddress(bytes: [UInt8](repeating: 1, count: count)) == nil)
    }

    // MARK: Endpoint

    @Test("endpoints print IPv6 in brackets")
    func endpointDescription() throws {
        #expect(Endpoint(.loopbackV4, 80).description == "127.0.0.1:80")
        #expect(Endpoint(.loopbackV6, 443).description == "[::1]:443")
        let mapped = Endpoint(try #require(IPAddress("::ffff:10.0.0.1")), 7000)
        #expect(mapped.description == "[::ffff:10.0.0.1]:7000")
        #expect(mapped.unmapped == Endpoint(.v4(0x0a00_0001), 7000))
        #expect(mapped.unmapped.description == "10.0.0.1:7000")
    }
}
