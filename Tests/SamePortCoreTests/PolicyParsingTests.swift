import SamePortCore
import Testing

/// The error `EgressMode(parsing:)` throws for `text`, or nil if it parses.
private func egressError(_ text: String) -> OptionError? {
    do {
        _ = try EgressMode(parsing: text)
        return nil
    } catch {
        return error
    }
}

/// The error `BusyPolicy(parsing:)` throws for `text`, or nil if it parses.
private func busyPolicyError(_ text: String) -> OptionError? {
    do {
        _ = try BusyPolicy(parsing: text)
        return nil
    } catch {
        return error
    }
}

@Suite("EgressMode parsing")
struct EgressModeTests {
    @Test("the named modes")
    func named() throws {
        #expect(try EgressMode(parsing: "same-port") == .samePort)
        #expect(try EgressMode(parsing: "ephemeral") == .ephemeral)
        #expect(EgressMode.samePort.description == "same-port")
        #expect(EgressMode.ephemeral.description == "ephemeral")
    }

    @Test("a fixed IPv4 egress")
    func fixedIPv4() throws {
        let mode = try EgressMode(parsing: "127.0.0.1:7000")
        #expect(mode == .fixed(Endpoint(.loopbackV4, 7000)))
        #expect(mode.description == "127.0.0.1:7000")
    }

    @Test("a fixed IPv6 egress")
    func fixedIPv6() throws {
        let mode = try EgressMode(parsing: "[::1]:7000")
        #expect(mode == .fixed(Endpoint(.loopbackV6, 7000)))
        #expect(mode.description == "[::1]:7000")
    }

    @Test("port 0 means that IP with a kernel-chosen port")
    func fixedPortZero() throws {
        #expect(try EgressMode(parsing: "10.0.0.1:0") == .fixed(Endpoint(.v4(0x0a00_0001), 0)))
    }

    @Test(
        "wildcards, host names and junk are refused",
        arguments: ["0.0.0.0:7000", "[::]:7000", "*:7000", "host.example:7000", "localhost:7000", "",
                    "same_port", "Same-Port", "EPHEMERAL"]
    )
    func rejects(text: String) throws {
        let error = try #require(egressError(text), "'\(text)' should not parse")
        #expect(
            error.message
                == "invalid egress '\(text)': expected same-port, ephemeral, client, client-ip, or a local IP:PORT such as 127.0.0.1:7000"
        )
        #expect(error.description == error.message)
    }

    @Test("A malformed address says what is wrong with it", arguments: [
        ("127.0.0.1", "the port is missing (IP:0 lets the kernel choose one)"),
        ("::1:7000", "an IPv6 address needs brackets, as in [::1]:8080"),
        ("127.0.0.1:70000", "the port '70000' is not a number from 0 to 65535"),
    ])
    func explains(text: String, reason: String) throws {
        let error = try #require(egressError(text), "'\(text)' should not parse")
        #expect(error.message == "invalid egress '\(text)': \(reason); expected same-port, ephemeral, client, client-ip, or a local IP:PORT such as 127.0.0.1:7000")
    }
}

@Suite("SpliceMode parsing")
struct SpliceModeTests {
    @Test("on and off", arguments: [("on", SpliceMode.on), ("off", .off)])
    func parses(text: String, mode: SpliceMode) throws {
        #expect(try SpliceMode(parsing: text) == mode)
        #expect(mode.rawValue == text)
    }

    @Test("anything else is refused", arguments: ["", "On", "yes", "true", "1", " off"])
    func rejects(text: String) throws {
        #expect(throws: OptionError("invalid splice setting '\(text)': expected on or off")) {
            try SpliceMode(parsing: text)
        }
    }
}
