import Glibc
import Logging
import SamePortNet

/// How log lines look.
enum LogFormat: String, CaseIterable, Sendable {
    case text
    case json
}

/// A swift-log handler that writes one line per record to stderr, as text or JSON.
///
/// Text: `2026-11-25T01:08:21.123Z info connection ended relay=main client=...`; JSON: one object
/// per line with `ts`, `level`, `msg` and the metadata, counts and durations as numbers. Each line
/// goes out in a single write(2), so lines from different threads never interleave.
struct StderrLogHandler: LogHandler {
    var logLevel: Logger.Level
    var metadata: Logger.Metadata = [:]
    let format: LogFormat
    /// stderr is journald's stream: each text line starts with its syslog priority (`<3>`) instead
    /// of a time and a level word; journald strips the prefix and stores the priority, so that
    /// `journalctl -p` filters.
    var journal = false

    /// Metadata keys printed first, in this order; the others follow sorted.
    private static let keyOrder = [
        "relay", "client", "egress", "upstream", "bytes_to_upstream", "bytes_to_client", "duration", "end", "cause",
    ]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var merged = metadata
        if let extra = event.metadata { merged.merge(extra) { $1 } }
        let keys = Self.keyOrder.filter { merged[$0] != nil } + merged.keys.filter { !Self.keyOrder.contains($0) }.sorted()
        let line: String
        switch format {
        case .text:
            // The journal keeps the time and the priority itself.
            var text = journal ? "\(event.message)" : "\(Self.timestamp()) \(event.level) \(event.message)"
            for key in keys {
                text += " \(key)=\(Self.quoteIfNeeded("\(merged[key]!)"))"  // keys come from `merged`
            }
            line = text + "\n"
        case .json:
            var json = "{\"ts\":\(Self.jsonString(Self.timestamp())),\"level\":\(Self.jsonString("\(event.level)")),\"msg\":\(Self.jsonString("\(event.message)"))"
            for key in keys {
                json += ",\(Self.jsonString(key)):\(Self.jsonValue(merged[key]!))"  // as above
            }
            line = json + "}\n"
        }
        var bytes = Array(((journal ? Self.priorityPrefix(event.level) : "") + line).utf8)
        bytes.withUnsafeMutableBytes { buffer in
            var offset = 0
            while offset < buffer.count {
                let written = write(2, buffer.baseAddress! + offset, buffer.count - offset)  // non-empty line
                if written < 0 && errno == EINTR { continue }
                if written <= 0 { return }
                offset += written
            }
        }
    }

    /// sd-daemon(3)'s prefixes: `<2>` critical ... `<7>` debug.
    static func priorityPrefix(_ level: Logger.Level) -> String {
        switch level {
        case .critical: "<2>"
        case .error: "<3>"
        case .warning: "<4>"
        case .notice: "<5>"
        case .info: "<6>"
        case .debug, .trace: "<7>"
        }
    }

    private static func quoteIfNeeded(_ value: String) -> String {
        guard value.isEmpty || value.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" }) else { return value }
        return jsonString(value)
    }

    /// A metadata value in JSON: a count (bytes, a queue position) or a duration (seconds) as a
    /// number, so that a log pipeline can sum and compare it without parsing; anything else as a
    /// string.
    static func jsonValue(_ value: Logger.Metadata.Value) -> String {
        if case .stringConvertible(let convertible) = value {
            if convertible is any BinaryInteger { return "\(convertible)" }
            if let number = convertible as? any LogNumber { return number.jsonNumber }
        }
        return jsonString("\(value)")
    }

    static func jsonString(_ value: String) -> String {
        var out = "\""
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                out += "\\u" + String(repeating: "0", count: 4 - String(scalar.value, radix: 16).count) + String(scalar.value, radix: 16)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }

    /// UTC time with milliseconds, ISO 8601.
    private static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var seconds = now.tv_sec
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func pad(_ value: Int32, _ width: Int) -> String {
            let text = String(value)
            return String(repeating: "0", count: max(0, width - text.count)) + text
        }
        return "\(parts.tm_year + 1900)-\(pad(parts.tm_mon + 1, 2))-\(pad(parts.tm_mday, 2))T"
            + "\(pad(parts.tm_hour, 2)):\(pad(parts.tm_min, 2)):\(pad(parts.tm_sec, 2)).\(pad(Int32(now.tv_nsec / 1_000_000), 3))Z"
    }
}
