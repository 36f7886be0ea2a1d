import CSamePortTOML
import CTOML
import Glibc

/// A value of a parsed TOML document, copied out of the parser's tree into Swift.
///
/// Why not TOMLKit's own `TOMLTable`: TOMLKit 0.6.0 never frees what it parses (its table has no
/// deinit), and each of its accessors (`keys`, `string`, `int`, `bool`) hands back memory from
/// malloc or strdup that nobody frees. A daemon that re-reads its file on every SIGHUP leaked
/// about 2 KB a reload that way. `TOMLNode.parse` reads the tree once through TOMLKit's C API,
/// frees each buffer it is given, then frees the tree (`sameport_toml_table_free`).
indirect enum TOMLNode: Sendable {
    case table([String: TOMLNode])
    case array([TOMLNode])
    case string(String)
    case int(Int)
    case bool(Bool)
    /// A float, date, time or date-time: no key of the file takes one; kept for the messages.
    case other(Kind)

    /// The TOML types, as messages name them.
    enum Kind: Sendable {
        case table, array, string, int, double, bool, date, time, dateTime
    }

    var type: Kind {
        switch self {
        case .table: .table
        case .array: .array
        case .string: .string
        case .int: .int
        case .bool: .bool
        case .other(let kind): kind
        }
    }

    var table: [String: TOMLNode]? {
        if case .table(let table) = self { table } else { nil }
    }

    var array: [TOMLNode]? {
        if case .array(let array) = self { array } else { nil }
    }

    var string: String? {
        if case .string(let string) = self { string } else { nil }
    }

    var int: Int? {
        if case .int(let int) = self { int } else { nil }
    }

    var bool: Bool? {
        if case .bool(let bool) = self { bool } else { nil }
    }

    /// Where and why toml++ stopped parsing.
    struct SyntaxError: Error {
        var description: String
        var line: Int
        var column: Int
    }

    /// The top-level table of the TOML document `text`.
    ///
    /// - Throws: the parser's first error.
    static func parse(_ text: String) throws(SyntaxError) -> [String: TOMLNode] {
        // Filled in only when the parse fails.
        let failure = UnsafeMutablePointer<CTOMLParseError>.allocate(capacity: 1)
        defer { failure.deallocate() }
        guard let root = text.withCString({ tableCreateFromString($0, failure) }) else {
            let error = failure.pointee
            // The message is strdup'd: ours to free.
            defer { free(UnsafeMutableRawPointer(mutating: error.description)) }
            throw SyntaxError(
                description: String(cString: error.description),
                line: Int(error.source.begin.line), column: Int(error.source.begin.column))
        }
        defer { sameport_toml_table_free(root) }
        return read(root)
    }

    private static func read(_ table: OpaquePointer) -> [String: TOMLNode] {
        let count = tableSize(table)
        // An array from malloc of keys from strdup (TOMLKit's Table.cpp): each is freed here.
        let keys = tableGetKeys(table)
        defer {
            for index in 0..<count { free(UnsafeMutableRawPointer(mutating: keys[index])) }
            free(UnsafeMutableRawPointer(mutating: keys))
        }
        var values: [String: TOMLNode] = [:]
        for index in 0..<count {
            guard let node = tableGetNode(table, keys[index]) else { continue }
            values[String(cString: keys[index])] = read(node: node)
        }
        return values
    }

    /// The value of `node`. The kind is found by asking for each in turn: TOMLKit's `nodeType`
    /// dereferences the result of a failed cast, and its date-time accessor mixes new and malloc.
    private static func read(node: OpaquePointer) -> TOMLNode {
        if let table = nodeAsTable(node) { return .table(read(table)) }
        if let array = nodeAsArray(node) {
            return .array((0..<arraySize(array)).map { read(node: arrayGetNode(array, Int64($0))) })
        }
        // Scalars come back in buffers from malloc or strdup.
        if let string = nodeAsString(node) {
            defer { free(UnsafeMutableRawPointer(mutating: string)) }
            return .string(String(cString: string))
        }
        if let int = nodeAsInt(node) {
            defer { free(UnsafeMutableRawPointer(mutating: int)) }
            return .int(Int(int.pointee))
        }
        if let bool = nodeAsBool(node) {
            defer { free(UnsafeMutableRawPointer(mutating: bool)) }
            return .bool(bool.pointee)
        }
        return .other(otherKind(node))
    }

    /// A float, a date, a time, or else a date-time (not asked for: see above).
    private static func otherKind(_ node: OpaquePointer) -> Kind {
        if let double = nodeAsDouble(node) {
            free(UnsafeMutableRawPointer(mutating: double))
            return .double
        }
        if let date = nodeAsDate(node) {
            free(UnsafeMutableRawPointer(mutating: date))
            return .date
        }
        if let time = nodeAsTime(node) {
            free(UnsafeMutableRawPointer(mutating: time))
            return .time
        }
        return .dateTime
    }
}
