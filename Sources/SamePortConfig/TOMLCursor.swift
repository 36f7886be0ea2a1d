/// A position in a TOML text that moves forward one Unicode scalar at a time, keeping the line and
/// column, and knows how to step over blanks, comments and strings.
struct TOMLCursor {
    let text: [Unicode.Scalar]
    var index = 0
    var line = 1
    var column = 1

    init(_ text: String) {
        self.text = Array(text.unicodeScalars)
        // A byte-order mark is not part of the first line's columns.
        if self.text.first == "\u{FEFF}" { index = 1 }
    }

    var position: SourcePosition { SourcePosition(line: line, column: column) }
    var current: Unicode.Scalar? { index < text.count ? text[index] : nil }

    func peek(_ offset: Int) -> Unicode.Scalar? {
        index + offset < text.count ? text[index + offset] : nil
    }

    mutating func advance(_ count: Int = 1) {
        for _ in 0..<count {
            guard let scalar = current else { return }
            index += 1
            if scalar == "\n" {
                line += 1
                column = 1
            } else {
                column += 1
            }
        }
    }

    /// Skips spaces and tabs.
    mutating func skipSpaces() {
        while let scalar = current, scalar == " " || scalar == "\t" { advance() }
    }

    /// Skips blanks, line ends and comments.
    mutating func skipTrivia() {
        while let scalar = current {
            if scalar == " " || scalar == "\t" || scalar == "\n" || scalar == "\r" {
                advance()
            } else if scalar == "#" {
                skipComment()
            } else {
                return
            }
        }
    }

    /// Skips to the end of the line.
    mutating func skipComment() {
        while let next = current, next != "\n" { advance() }
    }

    /// Steps over a basic, literal or multi-line string starting at the cursor and returns its raw
    /// content (escapes kept as written, which is all that key names in this file need). A
    /// single-line string ends at the line's end even when unterminated.
    @discardableResult
    mutating func scanString() -> String {
        guard let quote = current else { return "" }
        var content = ""
        if peek(1) == quote && peek(2) == quote {
            advance(3)
            while let scalar = current {
                if scalar == quote, peek(1) == quote, peek(2) == quote {
                    advance(3)
                    // Up to two more quotes may belong to the content ("""a"""").
                    while current == quote { advance() }
                    return content
                }
                if scalar == "\\" && quote == "\"" {
                    content.unicodeScalars.append(scalar)
                    advance()
                }
                if let next = current { content.unicodeScalars.append(next) }
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
}
