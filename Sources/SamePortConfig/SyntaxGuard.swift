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
        var open: [(Unicode.Scalar, SourcePosition)] = []
        let scalars = Array(text.unicodeScalars)
        var index = 0
        var line = 1, column = 1
        var atLineStart = true

        func at(_ offset: Int) -> Unicode.Scalar? {
            index + offset < scalars.count ? scalars[index + offset] : nil
        }
        func advance(_ count: Int = 1) {
            for _ in 0..<count where index < scalars.count {
                if scalars[index] == "\n" {
                    line += 1
                    column = 1
                } else {
                    column += 1
                }
                index += 1
            }
        }
        func skipBlanks() {
            while let scalar = at(0), scalar == " " || scalar == "\t" { advance() }
        }

        while let scalar = at(0) {
            let position = SourcePosition(line: line, column: column)
            if scalar == "\n" {
                advance()
                atLineStart = true
                continue
            }
            if scalar == " " || scalar == "\t" || scalar == "\r" {
                advance()
                continue
            }
            let wasAtLineStart = atLineStart
            atLineStart = false
            switch scalar {
            case "#":
                while let next = at(0), next != "\n" { advance() }
            case "\"", "'":
                let isMultiline = at(1) == scalar && at(2) == scalar
                if isMultiline {
                    advance(3)
                    while let next = at(0) {
                        if next == scalar, at(1) == scalar, at(2) == scalar {
                            advance(3)
                            while at(0) == scalar { advance() }
                            break
                        }
                        if next == "\\" && scalar == "\"" { advance() }
                        advance()
                    }
                } else {
                    advance()
                    while let next = at(0), next != scalar, next != "\n" {
                        if next == "\\" && scalar == "\"" { advance() }
                        advance()
                    }
                    if at(0) == scalar { advance() }
                }
            case "[" where wasAtLineStart && open.isEmpty:
                // A table header: its name must follow the bracket(s).
                advance()
                skipBlanks()
                if at(0) == "[" {
                    advance()
                    skipBlanks()
                }
                guard let first = at(0), isKeyStart(first) else {
                    return (position, "syntax error: a table header needs a name after its bracket: write [name] or [[name]]")
                }
                while let next = at(0), next != "\n" {
                    if next == "\"" || next == "'" || next == "#" { break }
                    advance()
                }
            case "[", "{":
                open.append((scalar, position))
                advance()
            case "]", "}":
                let expected: Unicode.Scalar = scalar == "]" ? "[" : "{"
                guard let (opener, openedAt) = open.popLast() else {
                    advance()
                    continue  // a stray closer is an error the parser reports by itself
                }
                guard opener == expected else {
                    return (position, "syntax error: '\(scalar)' cannot close the '\(opener)' opened at \(openedAt)")
                }
                advance()
            default:
                advance()
            }
        }
        return nil
    }

    private static func isKeyStart(_ scalar: Unicode.Scalar) -> Bool {
        (scalar.isASCII && (scalar.properties.isAlphabetic || ("0"..."9").contains(scalar)))
            || scalar == "_" || scalar == "-" || scalar == "\"" || scalar == "'"
    }
}
