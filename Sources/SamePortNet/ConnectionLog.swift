import Logging
import SamePortCore

/// The one line logged for every client connection, at its end.
///
/// `connection ended relay=main client=127.0.0.1:50000 egress=127.0.0.1:7000
/// upstream=127.0.0.1:9000 bytes_to_upstream=12 bytes_to_client=34 duration=0.012s end=completed`,
/// plus `cause="..."` when the end has one.
struct ConnectionLog {
    var relay: String
    var client: String
    var egress: String
    var upstream: String
    var bytesToUpstream: UInt64
    var bytesToClient: UInt64
    var duration: Duration
    var end: ConnectionEnd

    /// The level a connection's line is logged at, by how it ended.
    static func level(of end: ConnectionEnd) -> Logger.Level {
        switch end {
        case .completed, .clientReset, .upstreamReset, .idleTimeout, .shutdown: return .info
        case .refused: return .notice
        default: return .warning
        }
    }

    /// Whether a connection that ended so is logged at all: formatting the line (its addresses
    /// included) costs more than the rest of a short connection, so callers ask first.
    static func isLogged(_ end: ConnectionEnd, by logger: Logger) -> Bool {
        logger.logLevel <= level(of: end)
    }

    func log(to logger: Logger) {
        let level = Self.level(of: end)
        guard logger.logLevel <= level else { return }
        var metadata: Logger.Metadata = [
            "relay": .string(relay),
            "client": .string(client),
            "egress": .string(egress),
            "upstream": .string(upstream),
            "bytes_to_upstream": .stringConvertible(bytesToUpstream),
            "bytes_to_client": .stringConvertible(bytesToClient),
            "duration": .stringConvertible(LoggedDuration(duration)),
            "end": .string(end.label),
        ]
        if let cause = end.cause { metadata["cause"] = .string(cause) }
        logger.log(level: level, "connection ended", metadata: metadata)
    }
}

/// A metadata value that a JSON log line writes as a number rather than a string.
public protocol LogNumber: CustomStringConvertible, Sendable {
    /// The value as a JSON number.
    var jsonNumber: String { get }
}

/// A connection's duration: `0.012s` in text, `0.012` (seconds) in JSON.
struct LoggedDuration: LogNumber {
    private let seconds: String

    init(_ duration: Duration) {
        let milliseconds = Int64(duration.seconds * 1000)
        let fraction = String(milliseconds % 1000)
        seconds = "\(milliseconds / 1000).\(String(repeating: "0", count: 3 - fraction.count))\(fraction)"
    }

    var description: String { seconds + "s" }
    var jsonNumber: String { seconds }
}
