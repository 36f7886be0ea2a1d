import SamePortCore
import Testing

/// The error `Duration(parsing:)` throws for `text`, or nil if it parses.
private func durationError(_ text: String) -> DurationError? {
    do {
        _ = try Duration(parsing: text)
        return nil
    } catch {
        return error
    }
}

@Suite("Duration parsing")
struct DurationParsingTests {
    @Test(
        "a number with a unit",
        arguments: [
            ("250ms", Duration.milliseconds(250)),
            ("1ms", .milliseconds(1)),
            ("5s", .seconds(5)),
            ("1.5s", .milliseconds(1500)),
            ("0.25s", .milliseconds(250)),
            ("10m", .seconds(600)),
            ("1.5m", .seconds(90)),
            ("1h", .seconds(3600)),
            ("2h", .seconds(7200)),
            ("0", .zero),
            ("0s", .zero),
            ("0ms", .zero),
            ("  5s  ", .seconds(5)),
        ]
    )
    func parses(text: String, expected: Duration) throws {
        #expect(try Duration(parsing: text) == expected)
    }

    @Test("ms is not read as m or s")
    func millisecondsSuffix() throws {
        #expect(try Duration(parsing: "10ms") == .milliseconds(10))
        #expect(try Duration(parsing: "10m") == .seconds(600))
        #expect(try Duration(parsing: "10s") == .seconds(10))
    }

    @Test("malformed durations", arguments: ["5", "abc", "5 parsecs", "", "s", "ms", "1.2.3s", "5d", "5sec", "1e3s", "5 s"])
    func rejects(text: String) throws {
        let error = try #require(durationError(text), "'\(text)' should not parse")
        #expect(error.text == text)
        #expect(error.reason == "expected a number with a unit: ms, s, m or h (for example 250ms, 5s, 10m)")
        #expect(
            error.description
                == "invalid duration '\(text)': expected a number with a unit: ms, s, m or h (for example 250ms, 5s, 10m)"
        )
    }

    @Test("a negative duration says so", arguments: ["-1s", "-5s", " -250ms", "-0"])
    func negative(text: String) throws {
        let error = try #require(durationError(text), "'\(text)' should not parse")
        #expect(error.description == "invalid duration '\(text)': a duration cannot be negative: give 0 or more, for example 5s")
    }

    @Test("a duration too long for the clock is refused")
    func tooLong() throws {
        let error = try #require(durationError("999999999999h"))
        #expect(error.reason == "it is too long")
        #expect(error.description == "invalid duration '999999999999h': it is too long")
    }

    @Test("shortDescription round-trips", arguments: ["250ms", "5s", "10m", "1h", "1.5s", "1ms", "999ms", "90s", "2h", "90m", "0"])
    func shortDescriptionRoundTrip(text: String) throws {
        let duration = try Duration(parsing: text)
        #expect(duration.shortDescription == text)
        #expect(try Duration(parsing: duration.shortDescription) == duration)
    }

    @Test(
        "shortDescription picks the largest whole unit",
        arguments: [
            (Duration.milliseconds(250), "250ms"),
            (.seconds(5), "5s"),
            (.milliseconds(1500), "1.5s"),
            (.seconds(60), "1m"),
            (.seconds(600), "10m"),
            (.seconds(3600), "1h"),
            (.seconds(5400), "90m"),
            (.zero, "0"),
        ]
    )
    func shortDescription(duration: Duration, text: String) {
        #expect(duration.shortDescription == text)
    }

    @Test("seconds as a Double")
    func seconds() {
        #expect(Duration.milliseconds(1500).seconds == 1.5)
        #expect(Duration.seconds(3600).seconds == 3600)
        #expect(Duration.zero.seconds == 0)
    }
}
