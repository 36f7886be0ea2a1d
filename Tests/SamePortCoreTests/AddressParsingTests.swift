import SamePortCore
import Testing

/// The error `HostPort(parsing:)` throws for `text`, or nil if it parses.
private func addressError(_ text: String) -> AddressError? {
    do {
        _ = try HostPort(parsing: text)
        return nil
    } catch {
        return error
    }
}

@Suite("HostPort parsing")
struct AddressParsingTests {
    @Test("an IPv4 literal and port")
    func ipv4() throws {
        let hostPort = try HostPort(parsing: "127.0.0.1:80")
        #expect(hostPort.host == .ip(.loopbackV4))
        #expect(hostPort.port == 80)
        #expect(hostPort.endpoint == Endpoint(.loopbackV4, 80))
        #expect(hostPort.description == "127.0.0.1:80")
    }

    @Test("a bracketed IPv6 literal and port")
    func ipv6() throws {
        let hostPort = try HostPort(parsing: "[::1]:443")
        #expect(hostPort.host == .ip(.loopbackV6))
        #expect(hostPort.port == 443)
        #expect(hostPort.endpoint == Endpoint(.loopbackV6, 443))
        #expect(hostPort.description == "[::1]:443")

        let long = try HostPort(parsing: "[2001:DB8:0:0:0:0:0:1]:8080")
        #expect(long.host == .ip(.v6(high: 0x2001_0db8_0000_0000, low: 1)))
        #expect(long.description == "[2001:db8::1]:8080")

        let mapped = try HostPort(parsing: "[::ffff:1.2.3.4]:9")
        #expect(mapped.endpoint?.address.isIPv6 == true)
        #expect(mapped.endpoint?.unmapped == Endpoint(.v4(0x0102_0304), 9))
    }

    @Test("the wildcard host")
    func wildcard() throws {
        let hostPort = try HostPort(parsing: "*:7000")
        #expect(hostPort.host == .any)
        #expect(hostPort.port == 7000)
        #expect(hostPort.endpoint == nil)
        #expect(hostPort.description == "*:7000")
    }

    @Test(
        "host names",
        arguments: [
            ("example.org:8080", "example.org", UInt16(8080)),
            ("localhost:9000", "localhost", UInt16(9000)),
            ("my-host_1.internal:1", "my-host_1.internal", UInt16(1)),
            ("1.2.3.4a:5", "1.2.3.4a", UInt16(5)),
        ]
    )
    func hostNames(text: String, name: String, port: UInt16) throws {
        let hostPort = try HostPort(parsing: text)
        #expect(hostPort.host == .name(name))
        #expect(hostPort.port == port)
        #expect(hostPort.endpoint == nil)
        #expect(hostPort.description == text)
    }

    @Test("port bounds", arguments: [("1.2.3.4:0", UInt16(0)), ("1.2.3.4:65535", UInt16.max), ("1.2.3.4:1", UInt16(1))])
    func portBounds(text: String, port: UInt16) throws {
        #expect(try HostPort(parsing: text).port == port)
    }

    @Test(
        "malformed addresses name the problem",
        arguments: [
            ("", "it is empty"),
            ("127.0.0.1", "the port is missing"),
            ("localhost", "the port is missing"),
            ("127.0.0.1:", "the port is missing"),
            ("[::1]", "the port is missing"),
            ("[::1]:", "the port is missing"),
            ("[::1]80", "the port is missing"),
            ("127.0.0.1:99999", "the port '99999' is not a number from 0 to 65535"),
            ("127.0.0.1:65536", "the port '65536' is not a number from 0 to 65535"),
            ("127.0.0.1:abc", "the port 'abc' is not a number from 0 to 65535"),
            ("127.0.0.1:-1", "the port '-1' is not a number from 0 to 65535"),
            ("127.0.0.1:+80", "the port '+80' is not a number from 0 to 65535"),
            ("[::1]:x", "the port 'x' is not a number from 0 to 65535"),
            ("::1:80", "an IPv6 address needs brackets, as in [::1]:8080"),
            ("2001:db8::1:80", "an IPv6 address needs brackets, as in [::1]:8080"),
            ("[::1:80", "the '[' of an IPv6 address is not closed"),
            ("[1.2.3.4]:80", "'1.2.3.4' is not an IPv6 address"),
            ("[example.org]:80", "'example.org' is not an IPv6 address"),
            ("[]:80", "'' is not an IPv6 address"),
            (":80", "the host is missing (use *:PORT for every address)"),
            ("999.1.1.1:80", "'999.1.1.1' is neither an IP address nor a host name"),
            ("01.2.3.4:80", "'01.2.3.4' is neither an IP address nor a host name"),
            ("1.2.3:80", "'1.2.3' is neither an IP address nor a host name"),
            ("bad_host!:80", "'bad_host!' is neither an IP address nor a host name"),
            ("-bad.example:80", "'-bad.example' is neither an IP address nor a host name"),
            ("bad-.example:80", "'bad-.example' is neither an IP address nor a host name"),
            ("a..b:80", "'a..b' is neither an IP address nor a host name"),
            ("héllo:80", "'héllo' is neither an IP address nor a host name"),
            ("**:80", "'**' is neither an IP address nor a host name"),
        ]
    )
    func errors(text: String, reason: String) throws {
        let error = try #require(addressError(text), "'\(text)' should not parse")
        #expect(error.text == text)
        #expect(error.reason == reason)
        #expect(error == AddressError(text, reason))
    }

    @Test("a host name label is at most 63 characters")
    func labelLength() throws {
        let ok = String(repeating: "a", count: 63)
        #expect(try HostPort(parsing: "\(ok).example:80").host == .name("\(ok).example"))
        let tooLong = String(repeating: "a", count: 64)
        let error = try #require(addressError("\(tooLong).example:80"))
        #expect(error.reason == "'\(tooLong).example' is neither an IP address nor a host name")
    }

    @Test("the description quotes the text, says what is wrong and shows the expected forms")
    func errorDescription() throws {
        let missingPort = try #require(addressError("127.0.0.1"))
        #expect(
            missingPort.description
                == "invalid address '127.0.0.1': the port is missing; expected IP:PORT, [IPv6]:PORT, *:PORT or HOST:PORT"
        )
        let brackets = try #require(addressError("::1:80"))
        #expect(
            brackets.description
                == "invalid address '::1:80': an IPv6 address needs brackets, as in [::1]:8080; expected IP:PORT, [IPv6]:PORT, *:PORT or HOST:PORT"
        )
        #expect(
            AddressError("x", "y").description == "invalid address 'x': y; expected IP:PORT, [IPv6]:PORT, *:PORT or HOST:PORT"
        )
    }

    @Test("descriptions parse back to the same value", arguments: ["127.0.0.1:80", "[::1]:443", "*:7000", "example.org:8080",
                                                                   "[2001:db8::1]:1", "[::ffff:1.2.3.4]:22"])
    func descriptionRoundTrip(text: String) throws {
        let hostPort = try HostPort(parsing: text)
        #expect(try HostPort(parsing: hostPort.description) == hostPort)
    }
}
