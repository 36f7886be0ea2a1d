/// A line and column in the configuration file, both from 1; columns count Unicode scalars.
public struct SourcePosition: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var line: Int
    public var column: Int

    public init(line: Int, column: Int) {
        self.line = line
        self.column = column
    }

    public static let start = SourcePosition(line: 1, column: 1)

    public static func < (a: SourcePosition, b: SourcePosition) -> Bool {
        (a.line, a.column) < (b.line, b.column)
    }

    public var description: String { "\(line):\(column)" }
}

/// Where the tables, keys and values of a TOML document are, so that every problem found in the
/// parsed values can be reported at its place in the file.
///
/// TOMLKit parses and checks the syntax but keeps no positions; this scanner runs on text that
/// TOMLKit has accepted, so it only needs to follow the structure: table headers, keys, strings
/// (which may hold `#`, `[` or `=`), and arrays spread over several lines. Whatever it does not
/// understand ends the scan early; positions it could not find fall back to the enclosing table.
struct SourceLocator {
    /// A table header (`[defaults]`, `[[relay]]`) or the root, and the keys written under it.
    struct Table {
        /// The header's dotted key, e.g. `["relay"]`; empty for the root.
        var path: [String]
        var isArrayElement: Bool
        var position: SourcePosition
        var keys: [String: Key] = [:]
    }

    /// One `key = value` line: where its key and value start, and each element of an array value.
    struct Key {
        var position: SourcePosition
        var value: SourcePosition
        var elements: [SourcePosition]
    }

    private(set) var tables: [Table]

    init(_ text: String) {
        var scanner = Scanner(Array(text.unicodeScalars))
        tables = scanner.scanDocument()
    }

    /// The table of the `index`-th `[[name]]` header.
    func arrayElement(_ name: String, index: Int) -> Table? {
        let elements = tables.filter { $0.path == [name] && $0.isArrayElement }
        return index < elements.count ? elements[index] : nil
    }

    /// The `[name]` table.
    func table(_ name: String) -> Table? {
        tables.first { $0.path == [name] && !$0.isArrayElement }
    }

    var root: Table? { tables.first { $0.path.isEmpty } }

    private struct Scanner {
        let text: [Unicode.Scalar]
        var index = 0
        var line = 1
        var column = 1

        init(_ text: [Unicode.Scalar]) {
            self.text = text
        }

        var position: SourcePosition { SourcePosition(line: line, column: column) }
        var current: Unicode.Scalar? { index < text.count ? text[index] : nil }

        func peek(_ offset: Int) -> Unicode.Scalar? {
            index + offset < text.count ? text[index + offset] : nil
        }

        mutating func advance() {
            guard let scalar = current else { return }
            index += 1
            if scalar == "\n" {
                line += 1
                column = 1
            } else {
                column += 1
            }
        }

        mutating func skipSpaces() {
            while let scalar = current, scalar == " " || scalar == "\t" { advance() }
        }

        /// Skips blanks, line ends and comments.
        mutating func skipTrivia() {
            while let scalar = current {
                if scalar == " " || scalar == "\t" || scalar == "\n" || scalar == "\r" {
                    advance()
                } else if scalar == "#" {
                    while let next = current, next != "\n" { advance() }
                } else {
                    return
                }
            }
        }

        mutating func scanDocument() -> [Table] {
            var tables = [Table(path: [], isArrayElement: false, position: .start)]
            while true {
                skipTrivia()
                guard let scalar = current else { break }
                let start = index
                if scalar == "[" {
                    let position = self.position
                    let isArray = peek(1) == "["
                    advance()
                    if isArray { advance() }
                    skipSpaces()
                    let path = scanKeyPath()
                    tables.append(Table(path: path, isArrayElement: isArray, position: position))
                    while let next = current, next != "\n" { advance() }  // the closing brackets, a comment
                } else {
                    let keyPosition = position
                    let path = scanKeyPath()
                    skipSpaces()
                    guard current == "=" else { break }
                    advance()
                    skipSpaces()
                    let valuePosition = position
                    var elements: [SourcePosition] = []
                    scanValue(elements: &elements)
                    if let first = path.first, let last = tables.indices.last, tables[last].keys[first] == nil {
                        tables[last].keys[first] = Key(position: keyPosition, value: valuePosition, elements: elements)
                    }
                }
                if index == start { break }  // nothing understood: stop rather than loop
            }
            return tables
        }

        /// `a.b."c d".'e'`, stopping before `=` or `]`.
        mutating func scanKeyPath() -> [String] {
            var path: [String] = []
            while let scalar = current {
                if scalar == "\"" || scalar == "'" {
                    path.append(scanString())
                } else if isBareKeyScalar(scalar) {
                    var key = ""
                    while let next = current, isBareKeyScalar(next) {
                        key.unicodeScalars.append(next)
                        advance()
                    }
                    path.append(key)
                } else {
                    break
                }
                skipSpaces()
                guard current == "." else { break }
                advance()
                skipSpaces()
            }
            return path
        }

        func isBareKeyScalar(_ scalar: Unicode.Scalar) -> Bool {
            scalar.isASCII && (scalar.properties.isAlphabetic || ("0"..."9").contains(scalar) || scalar == "_" || scalar == "-")
        }

        /// A basic, literal or multi-line string; returns its raw content (escapes kept as written,
        /// which is all that key names in this file need).
        @discardableResult
        mutating func scanString() -> String {
            guard let quote = current else { return "" }
            let isMultiline = peek(1) == quote && peek(2) == quote
            var content = ""
            if isMultiline {
                advance(); advance(); advance()
                while let scalar = current {
                    if scalar == quote, peek(1) == quote, peek(2) == quote {
                        advance(); advance(); advance()
                        // Up to two more quotes may belong to the content ("""a"""").
                        while current == quote { advance() }
                        return content
                    }
                    if scalar == "\\" && quote == "\"" {
                        advance()
                    }
                    if let escaped = current { content.unicodeScalars.append(escaped) }
                    advance()
                }
                return content
            }
            advance()
            while let scalar = current, scalar != quote, scalar != "\n" {
                if scalar == "\\" && quote == "\"" {
                    content.unicodeScalars.append(scalar)
                    advance()
                }
                if let next = current { content.unicodeScalars.append(next) }
                advance()
            }
            if current == quote { advance() }
            return content
        }

        /// Any value; for an array, records where each of its elements starts.
        mutating func scanValue(elements: inout [SourcePosition]) {
            guard let scalar = current else { return }
            switch scalar {
            case "\"", "'":
                scanString()
            case "[":
                advance()
                while true {
                    skipTrivia()
                    guard let next = current else { return }
                    if next == "]" {
                        advance()
                        return
                    }
                    if next == "," {
                        advance()
                        continue
                    }
                    elements.append(position)
                    let before = index
                    var nested: [SourcePosition] = []
                    scanValue(elements: &nested)
                    if index == before { advance() }
                }
            case "{":
                advance()
                while true {
                    skipTrivia()
                    guard let next = current else { return }
                    if next == "}" {
                        advance()
                        return
                    }
                    let before = index
                    if next == "\"" || next == "'" {
                        scanString()
                    } else if next == "[" || next == "{" {
                        var nested: [SourcePosition] = []
                        scanValue(elements: &nested)
                    } else {
                        advance()
                    }
                    if index == before { advance() }
                }
            default:
                // A number, date, boolean: up to the next separator.
                while let next = current, !" \t\r\n,]}#".unicodeScalars.contains(next) { advance() }
            }
        }
    }
}
