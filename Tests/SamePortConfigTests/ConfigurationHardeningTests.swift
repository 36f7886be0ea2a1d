import Foundation
import SamePortConfig
import SamePortCore
import Testing

/// The problems of a configuration file's bytes, as the lines a user sees, or [] when it is valid.
private func problems(bytes: [UInt8]) -> [String] {
    do {
        _ = try Configuration(bytes: bytes, path: "f.toml")
        return []
    } catch {
        return error.problems.map(\.description)
    }
}

/// One valid relay, for files that differ from it in one place.
private let relay = """
    [[relay]]
    name = "a"
    listen = "127.0.0.1:7000"
    upstream = "127.0.0.1:9000"

    """

/// `count` relays on distinct addresses of one port.
private func relays(_ count: Int, listen: (Int) -> String = { "127.0.\($0 / 250).\($0 % 250 + 1):7000" }) -> String {
    var text = "[defaults]\nupstream = \"127.0.0.1:9000\"\n"
    for index in 0..<count {
        text += "\n[[relay]]\nname = \"r\(index)\"\nlisten = \"\(listen(index))\"\n"
    }
    return text
}

@Suite("Configuration file: text the parser would lose")
struct ConfigurationTextTests {
    @Test("A NUL byte is refused where it is, even in a comment: the parser would have dropped every line after it")
    func nul() {
        // Issue 11: the deny line below the comment was ignored and 127.0.0.3 was served.
        #expect(problems(relay + "# managed by tool \u{0}\ndeny = [\"127.0.0.3\"]\n")
            == ["f.toml:5:19: a NUL byte (U+0000): TOML forbids control characters, and the parser would ignore everything after it; remove it"])
        #expect(problems("[[relay]]\nname = \"a\u{0}b\"\n")
            == ["f.toml:2:10: a NUL byte (U+0000): TOML forbids control characters, and the parser would ignore everything after it; remove it"])
    }

    @Test("Other control characters, in comments, strings and keys; tab and CR LF are fine")
    func controlCharacters() {
        #expect(problems(relay + "# bell \u{7}\nallow = \"127.0.0.1\u{1B}\"\ndeny\u{7F} = []\n") == [
            "f.toml:5:8: control character U+0007: TOML forbids control characters other than tab; remove it (in a string, write it as \\u0007)",
            "f.toml:6:19: control character U+001B: TOML forbids control characters other than tab; remove it (in a string, write it as \\u001B)",
            "f.toml:7:5: control character U+007F: TOML forbids control characters other than tab; remove it (in a string, write it as \\u007F)",
        ])
        #expect(problems(relay.replacingOccurrences(of: "\n", with: "\r\n") + "deny =\t[]\t# tab\r\n") == [])
    }

    @Test("A CR without LF, a byte-order mark past the start, and bytes that are not UTF-8")
    func lostText() {
        #expect(problems("[[relay]]\rname = \"a\"\nlisten = \"127.0.0.1:7000\"\r")
            == [
                "f.toml:1:10: a carriage return (CR) without a line feed after it: TOML ends lines with LF or CR LF, so the text around it is read as one line; save the file with LF line ends",
                "f.toml:2:26: a carriage return (CR) without a line feed after it: TOML ends lines with LF or CR LF, so the text around it is read as one line; save the file with LF line ends",
            ])
        #expect(problems("\u{FEFF}" + relay) == [])
        #expect(problems(relay + "\u{FEFF}[[relay]]\n")
            == ["f.toml:5:1: a byte-order mark (U+FEFF) in the middle of the file, invisible in an editor (files joined together?): remove it"])
        #expect(problems(relay + "deny = [\"127.0.0.3\"]\n".replacingOccurrences(of: "3", with: "3\u{FEFF}"))
            == ["f.toml:5:19: a byte-order mark (U+FEFF) in the middle of the file, invisible in an editor (files joined together?): remove it"])
        // Latin-1 "é" after a valid "é": the position counts characters, the byte number bytes.
        #expect(problems(bytes: Array((relay + "# é ").utf8) + [0xE9, 0x0A])
            == ["f.toml:5:5: the file is not valid UTF-8 here (byte 81, 0xE9): the parser would read other text than the file holds; save it as UTF-8"])
        // An overlong encoding of "/" and a UTF-16 surrogate are not UTF-8 either.
        #expect(problems(bytes: [0x61, 0xC0, 0xAF]).first?.hasPrefix("f.toml:1:2: the file is not valid UTF-8 here (byte 2, 0xC0)") == true)
        #expect(problems(bytes: [0x0A, 0xED, 0xA0, 0x80]).first?.hasPrefix("f.toml:2:1: the file is not valid UTF-8 here (byte 2, 0xED)") == true)
    }

    @Test("Many such characters: ten are placed, the rest counted")
    func manyCharacters() {
        let found = problems(String(repeating: "#\u{1}\n", count: 25))
        #expect(found.count == 11)
        #expect(found.last == "f.toml:11:2: 15 more characters like the ones above from here on: remove them")
    }
}

@Suite("Configuration file: limits checked before parsing")
struct ConfigurationLimitTests {
    @Test("Nesting 90,000 deep (a stack overflow in the parser before) is refused at the 17th bracket")
    func nesting() {
        let message = "brackets and braces nested more than 16 deep: a sameport file needs at most 3 (relay = [{ upstream = [\"...\"] }]); close the brackets you opened"
        #expect(problems(relay.replacingOccurrences(of: "upstream = ", with: "upstream = " + String(repeating: "[", count: 90_000)))
            == ["f.toml:4:28: \(message)"])
        #expect(problems("x = " + String(repeating: "[", count: 200_000)) == ["f.toml:1:21: \(message)"])
        #expect(problems("x = " + String(repeating: "{ a = ", count: 50_000)) == ["f.toml:1:101: \(message)"])
        // 16 deep is still parsed (and then reported as a list of the wrong kind).
        let sixteen = relay.replacingOccurrences(
            of: "upstream = \"127.0.0.1:9000\"",
            with: "upstream = " + String(repeating: "[", count: 16) + "\"127.0.0.1:9000\"" + String(repeating: "]", count: 16))
        #expect(problems(sixteen) == ["f.toml:4:13: 'upstream' must list strings; element 1 is a list"])
    }

    @Test("A dotted key of 100,000 parts, a key of 129 characters, a table header with either")
    func keys() {
        let dotted = Array(repeating: "a", count: 100_000).joined(separator: ".")
        let parts = "a dotted key of more than 16 parts: each part nests a table, and a sameport file needs at most 2 ([relay.name]); remove the extra dots"
        #expect(problems(dotted + " = 1\n") == ["f.toml:1:33: \(parts)"])
        #expect(problems("[" + dotted + "]\n") == ["f.toml:1:34: \(parts)"])
        let long = "a key longer than 128 characters: sameport's keys are short words (the longest is connect_timeout); is a quote or an '=' missing?"
        #expect(problems(relay + String(repeating: "k", count: 129) + " = 1\n") == ["f.toml:5:1: \(long)"])
        #expect(problems(relay + "x = { \"" + String(repeating: "k", count: 200) + "\" = 1 }\n") == ["f.toml:5:7: \(long)"])
        #expect(problems("[[" + String(repeating: "r", count: 3_000_000) + "]]\n") == ["f.toml:1:3: \(long)"])
        // 128 is still a key (unknown, and reported as such).
        let key = String(repeating: "k", count: 128)
        #expect(problems(relay + key + " = 1\n").first?.hasPrefix("f.toml:5:1: unknown key '\(key)' in [[relay]]") == true)
    }

    @Test("More than 10,000 relays, as [[relay]] headers or as an inline list; more than 10,100 tables")
    func relayCount() {
        #expect(problems(relays(10_001)).first
            == "f.toml:40004:1: more than 10000 [[relay]] tables: one sameport process runs at most 10000 relays; split them across several files, one service each")
        let inline = "relay = [" + Array(repeating: "{}", count: 10_001).joined(separator: ",") + "]\n"
        #expect(problems(inline)
            == ["f.toml:1:1: 10001 relays: one sameport process runs at most 10000; split them across several files, one service each"])
        #expect(problems((0...10_100).map { "[t\($0)]\n" }.joined()).first
            == "f.toml:10101:1: more than 10100 tables ([headers] and { inline tables }): a file of 10000 relays needs no more; is the file generated by mistake?")
        #expect(problems(relays(10_000)) == [])
    }

    @Test("A file larger than 4 MiB is refused before anything else")
    func fileSize() {
        let text = relay + "# " + String(repeating: "x", count: 4 << 20) + "\n"
        #expect(problems(text)
            == ["f.toml:1:1: the file is larger than 4 MiB, the most a configuration file may be (10000 relays need far less): is it the right file?"])
    }

    @Test("A relay name longer than 255 characters, which is not repeated in the messages")
    func nameLength() {
        let long = String(repeating: "n", count: 1 << 20)
        let twice = relays(2) { "127.0.0.1:\(7000 + $0)" }
            .replacingOccurrences(of: "name = \"r0\"", with: "name = \"\(long)\"")
            .replacingOccurrences(of: "name = \"r1\"", with: "name = \"\(long)\"")
        let found = problems(twice)
        #expect(found.allSatisfy { $0.count < 400 }, "\(found.map { $0.prefix(400) })")
        #expect(found.count == 3)
        #expect(found.first == "f.toml:5:8: relay name of 1048576 characters: a name is at most 255 (it also names the relay's socket in systemd's FileDescriptorName=); shorten it")
        #expect(found.contains { $0.hasPrefix("f.toml:9:1: duplicate relay name 'nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn…': relay #1 (line 4) already has it") })
        #expect(problems(relay.replacingOccurrences(of: "\"a\"", with: "\"\(String(repeating: "n", count: 255))\"")) == [])
    }
}

@Suite("Configuration file: across relays")
struct ConfigurationAcrossRelaysTests {
    @Test("Duplicate names are reported even when those relays also have other problems")
    func duplicatesWithOtherProblems() {
        #expect(problems("""
            [defaults]
            upstream = "127.0.0.1:9000"

            [[relay]]
            name = "a"
            listen = "127.0.0.1:7000"

            [[relay]]
            name = "a"
            listen = "nonsense"

            [[relay]]
            name = "a"
            upstream = "127.0.0.1"
            """) == [
            "f.toml:9:1: duplicate relay name 'a': relay #1 (line 4) already has it; give each relay its own name",
            "f.toml:10:10: invalid address 'nonsense': the port is missing; expected IP:PORT, [IPv6]:PORT, *:PORT or HOST:PORT",
            "f.toml:12:1: relay 'a' has no listen address: add listen = \"IP:PORT\" (or \"*:PORT\")",
            "f.toml:13:1: duplicate relay name 'a': relay #1 (line 4) already has it; give each relay its own name",
            "f.toml:14:12: invalid address '127.0.0.1': the port is missing; expected IP:PORT, [IPv6]:PORT, *:PORT or HOST:PORT",
        ])
    }

    @Test("5,000 relays are checked in linear time (5,000 took 96 s in a debug build when every pair was compared)")
    func manyRelays() throws {
        let clock = ContinuousClock()
        let text = relays(5_000)
        var count = 0
        let elapsed = try clock.measure { count = try Configuration(text: text, path: "f.toml").relays.count }
        #expect(count == 5_000)
        #expect(elapsed < .seconds(10), "5,000 relays took \(elapsed)")
    }

    @Test("5,000 relays on *:7000: each names at most 8 it overlaps, and counts the rest")
    func manyOverlaps() {
        let found = problems(relays(5_000) { _ in "*:7000" })
        #expect(found.count == (1...8).reduce(0, +) + 4_991 * 9)
        #expect(found.contains("f.toml:20002:1: relay 'r4999' listens on *:7000, which overlaps 4991 relays besides the 8 named here; give each relay its own address or port"))
        #expect(found.filter { $0.hasPrefix("f.toml:20002:1: ") }.count == 9)
        let mixed = problems("""
            [defaults]
            upstream = ["127.0.0.1:9000", "[::1]:9000"]
            [[relay]]
            name = "v4"
            listen = "0.0.0.0:7000"
            [[relay]]
            name = "v6"
            listen = "[::]:7000"
            [[relay]]
            name = "one"
            listen = "127.0.0.1:7000"
            [[relay]]
            name = "six"
            listen = "[::1]:7000"
            [[relay]]
            name = "any"
            listen = "*:7000"
            [[relay]]
            name = "other"
            listen = "127.0.0.1:7001"
            """)
        #expect(mixed == [
            "f.toml:11:1: relay 'one' listens on 127.0.0.1:7000, which overlaps relay 'v4' (line 3) on 0.0.0.0:7000; give each relay its own address or port",
            "f.toml:14:1: relay 'six' listens on [::1]:7000, which overlaps relay 'v6' (line 6) on [::]:7000; give each relay its own address or port",
            "f.toml:17:1: relay 'any' listens on *:7000, which overlaps relay 'one' (line 9) on 127.0.0.1:7000; give each relay its own address or port",
            "f.toml:17:1: relay 'any' listens on *:7000, which overlaps relay 'six' (line 12) on [::1]:7000; give each relay its own address or port",
            "f.toml:17:1: relay 'any' listens on *:7000, which overlaps relay 'v4' (line 3) on 0.0.0.0:7000; give each relay its own address or port",
            "f.toml:17:1: relay 'any' listens on *:7000, which overlaps relay 'v6' (line 6) on [::]:7000; give each relay its own address or port",
        ])
    }
}
