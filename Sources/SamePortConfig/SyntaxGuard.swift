/// Refuses, before TOMLKit sees them, the malformed documents that make its parser (toml++ 3.x)
/// stop the process on an internal assertion instead of returning an error: a table header with no
/// name after its bracket (`[ # note`), and brackets that do not nest (`allow = [}`). Found by the
/// mutation test in SamePortConfigTests; a configuration file is user input, and a typo in it must
/// get a message, not a crash.
///
/// Valid TOML always passes: brackets outside strings and comments always nest, and every header
/// starts with a key.
enum SyntaxGuard {
    /// The first such problem, or nil when the document may go to the parser.
    static func check(_ text: String) -> (SourcePosition, String)? {
        var cursor = TOMLCursor(text)
        var open: [(Unicode.Scalar, SourcePosition)] = []
        var atLineStart = true
        while let scalar = cursor.current {
            let position = cursor.position
            if scalar == "\n" {
                cursor.advance()
                atLineStart = true
                continue
            }
            if scalar == " " || scalar == "\t" || scalar == "\r" {
                cursor.advance()
                continue
            }
            let wasAtLineStart = atLineStart
            atLineStart = false
            switch scalar {
            case "#":
                cursor.skipComment()
            case "\"", "'":
                cursor.scanString()
            case "[" where wasAtLineStart && open.isEmpty:
                // A table header: its name must follow the bracket(s).
                cursor.advance()
                cursor.skipSpaces()
                if cursor.current == "[" {
                    cursor.advance()
                    cursor.skipSpaces()
                }
                guard let first = cursor.current, isKeyStart(first) else {
                    return (position, "syntax error: a table header needs a name after its bracket: write [name] or [[name]]")
                }
            case "[", "{":
                open.append((scalar, position))
                cursor.advance()
            case "]", "}":
                cursor.advance()
                // A stray closer is an error that the parser reports by itself.
                guard let (opener, openedAt) = open.popLast() else { continue }
                guard opener == (scalar == "]" ? "[" : "{") else {
                    return (position, "syntax error: '\(scalar)' cannot close the '\(opener)' opened at \(openedAt)")
                }
            default:
                cursor.advance()
            }
        }
        return nil
    }

    private static func isKeyStart(_ scalar: Unicode.Scalar) -> Bool {
        (scalar.isASCII && (scalar.properties.isAlphabetic || ("0"..."9").contains(scalar)))
            || scalar == "_" || scalar == "-" || scalar == "\"" || scalar == "'"
    }
}
