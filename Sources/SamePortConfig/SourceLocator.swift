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
    /// For each `[[name]]`, the indices in `tables` of its headers in file order: looking up the
    /// relays one by one stays linear in their count.
    private let arrayElements: [String: [Int]]

    init(_ text: String) {
        var cursor = TOMLCursor(text)
        tables = cursor.scanDocument()
        var arrayElements: [String: [Int]] = [:]
        for (index, table) in tables.enumerated() where table.isArrayElement && table.path.count == 1 {
            arrayElements[table.path[0], default: []].append(index)
        }
        self.arrayElements = arrayElements
    }

    /// The table of the `index`-th `[[name]]` header.
    func arrayElement(_ name: String, index: Int) -> Table? {
        guard let elements = arrayElements[name], elements.indices.contains(index) else { return nil }
        return tables[elements[index]]
    }

    /// The `[name]` table.
    func table(_ name: String) -> Table? {
        tables.first { $0.path == [name] && !$0.isArrayElement }
    }

    var root: Table? { tables.first { $0.path.isEmpty } }
}

/// The scan behind `SourceLocator`.
extension TOMLCursor {
    mutating func scanDocument() -> [SourceLocator.Table] {
        var tables = [SourceLocator.Table(path: [], isArrayElement: false, position: .start)]
        // The last table of each path, for `[relay.extra]`: a lookup, not a search per header.
        var lastTable: [[String]: Int] = [[]: 0]
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
                // `[relay.extra]` is a key of the relay above it: locate it at its header.
                if let name = path.last, path.count > 1,
                   let parent = lastTable[Array(path.dropLast())],
                   tables[parent].keys[name] == nil {
                    tables[parent].keys[name] = SourceLocator.Key(position: position, value: position, elements: [])
                }
                lastTable[path] = tables.count
                tables.append(SourceLocator.Table(path: path, isArrayElement: isArray, position: position))
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
                    tables[last].keys[first] = SourceLocator.Key(position: keyPosition, value: valuePosition, elements: elements)
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
        ("a"..."z").contains(scalar) || ("A"..."Z").contains(scalar) || ("0"..."9").contains(scalar) || scalar == "_" || scalar == "-"
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
            // A number, date, boolean: up to the next separator. A date and a time may be
            // separated by a space (1979-05-27 07:32:00).
            let start = index
            scanToken()
            if index - start == 10, text[start + 4] == "-", text[start + 7] == "-",
               current == " ", let next = peek(1), ("0"..."9").contains(next) {
                advance()
                scanToken()
            }
        }
    }

    private mutating func scanToken() {
        while let next = current, !" \t\r\n,]}#".unicodeScalars.contains(next) { advance() }
    }
}
