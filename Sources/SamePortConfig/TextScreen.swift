/// Refuses, before any TOML library sees the file, the characters through which text is lost or
/// changed on its way from the file to the parser.
///
/// toml++ reads a C string: everything after a NUL was silently ignored, even after a comment
/// (a `deny` line below `# managed by tool \0` vanished and the relay served the client it should
/// have refused). TOML forbids every control character but tab and the line ends, so the file is
/// refused where it has one. So are the ways a file can differ from what an editor shows: bytes
/// that are not UTF-8 (decoding would replace them), a byte-order mark past the start (invisible;
/// inside a name it makes another name) and a carriage return not followed by a line feed (an old
/// Mac line end, which TOML does not take as one).
///
/// Positions count lines and Unicode scalars as `TOMLCursor` does (a leading BOM takes no column).
enum TextScreen {
    /// At most this many characters are reported; the count of the others follows.
    static let reportLimit = 10

    /// Every such character, up to `reportLimit`, with its position; empty when the text may go
    /// to the parser. Invalid UTF-8 ends the scan: what follows it cannot be placed.
    static func check(_ bytes: [UInt8]) -> [(SourcePosition, String)] {
        var problems: [(SourcePosition, String)] = []
        var unreported = 0
        var firstUnreported = SourcePosition.start
        func add(_ position: SourcePosition, _ message: String) {
            if problems.count < reportLimit {
                problems.append((position, message))
            } else {
                if unreported == 0 { firstUnreported = position }
                unreported += 1
            }
        }
        var iterator = bytes.makeIterator()
        var decoder = UTF8()
        var line = 1, column = 1, offset = 0
        var carriageReturn: SourcePosition?
        decoding: while true {
            let scalar: Unicode.Scalar
            switch decoder.decode(&iterator) {
            case .scalarValue(let value): scalar = value
            case .emptyInput: break decoding
            case .error:
                let byte = offset < bytes.count ? bytes[offset] : 0
                add(SourcePosition(line: line, column: column),
                    "the file is not valid UTF-8 here (byte \(offset + 1), 0x\(hex(byte))): the parser would read other text than the file holds; save it as UTF-8")
                break decoding
            }
            let position = SourcePosition(line: line, column: column)
            let isFirst = offset == 0
            offset += UTF8.width(scalar)
            if let at = carriageReturn, scalar != "\n" {
                add(at, "a carriage return (CR) without a line feed after it: TOML ends lines with LF or CR LF, so the text around it is read as one line; save the file with LF line ends")
            }
            carriageReturn = nil
            switch scalar {
            case "\n":
                line += 1
                column = 1
                continue decoding
            case "\r":
                carriageReturn = position
            case "\t":
                break
            case "\u{FEFF}" where isFirst:
                // A byte-order mark at the start is allowed and takes no column.
                continue decoding
            case "\u{FEFF}":
                add(position, "a byte-order mark (U+FEFF) in the middle of the file, invisible in an editor (files joined together?): remove it")
            case "\0":
                add(position, "a NUL byte (U+0000): TOML forbids control characters, and the parser would ignore everything after it; remove it")
            case _ where scalar.value < 0x20 || scalar.value == 0x7F:
                add(position, "control character U+\(hex(scalar.value, width: 4)): TOML forbids control characters other than tab; remove it (in a string, write it as \\u\(hex(scalar.value, width: 4)))")
            default:
                break
            }
            column += 1
        }
        if let at = carriageReturn {
            add(at, "a carriage return (CR) without a line feed after it: TOML ends lines with LF or CR LF, so the text around it is read as one line; save the file with LF line ends")
        }
        if unreported > 0 {
            problems.append((firstUnreported, "\(unreported) more character\(unreported == 1 ? "" : "s") like the ones above from here on: remove them"))
        }
        return problems
    }

    private static func hex(_ value: some BinaryInteger, width: Int = 2) -> String {
        let digits = String(value, radix: 16, uppercase: true)
        return String(repeating: "0", count: max(0, width - digits.count)) + digits
    }
}
