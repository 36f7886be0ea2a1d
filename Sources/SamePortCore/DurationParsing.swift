/// Durations as users write them: `250ms`, `5s`, `1.5s`, `10m`, `1h`, or `0`.
extension Duration {
    /// Parses a number followed by `ms`, `s`, `m` or `h`; `0` alone means zero.
    public init(parsing text: String) throws(DurationError) {
        let trimmed = text.trimmingWhitespace()
        if trimmed == "0" {
            self = .zero
            return
        }
        if trimmed.hasPrefix("-") {
            throw DurationError(text: text, reason: "a duration cannot be negative: give 0 or more, for example 5s")
        }
        let units: [(String, Double)] = [("ms", 1e-3), ("s", 1), ("m", 60), ("h", 3600)]
        for (suffix, scale) in units where trimmed.hasSuffix(suffix) {
            let number = trimmed.dropLast(suffix.count)
            // "10ms" also ends in "s": only accept the suffix whose remaining text is a number.
            guard !number.isEmpty, number.allSatisfy({ $0.isASCIIDigit || $0 == "." }),
                  let value = Double(number), value.isFinite else { continue }
            let nanoseconds = (value * scale * 1e9).rounded()
            guard nanoseconds < 1e18 else { throw DurationError(text: text, reason: "it is too long") }
            self = .nanoseconds(Int64(nanoseconds))
            return
        }
        throw DurationError(text: text, reason: "expected a number with a unit: ms, s, m or h (for example 250ms, 5s, 10m)")
    }

    /// The duration in seconds as a Double.
    public var seconds: Double {
        let (whole, attoseconds) = components
        return Double(whole) + Double(attoseconds) / 1e18
    }

    /// A short form for logs and tables: `250ms`, `5s`, `1.5s`, `10m`.
    public var shortDescription: String {
        let milliseconds = (seconds * 1000).rounded()
        if milliseconds == 0 { return "0" }
        if milliseconds < 1000 { return "\(Int(milliseconds))ms" }
        let secs = milliseconds / 1000
        if secs.truncatingRemainder(dividingBy: 3600) == 0 { return "\(Int(secs / 3600))h" }
        if secs.truncatingRemainder(dividingBy: 60) == 0 { return "\(Int(secs / 60))m" }
        if secs == secs.rounded() { return "\(Int(secs))s" }
        return "\(secs)s"
    }
}

/// A duration that could not be parsed.
public struct DurationError: Error, Equatable, Sendable, CustomStringConvertible {
    public var text: String
    public var reason: String

    public var description: String { "invalid duration '\(text)': \(reason)" }
}

extension StringProtocol {
    func trimmingWhitespace() -> Substring {
        let start = firstIndex { !$0.isWhitespace } ?? endIndex
        let end = lastIndex { !$0.isWhitespace }.map(index(after:)) ?? start
        return self[start..<end].toSubstring()
    }

    private func toSubstring() -> Substring { Substring(self) }
}
