import Foundation
import Glibc
import SamePortConfig
import SamePortCore
import Testing

private func relays(_ text: String) throws -> [RelaySpec] {
    try Configuration(text: text, path: "f.toml").relays
}

private func hostPort(_ text: String) throws -> HostPort { try HostPort(parsing: text) }

@Suite("Configuration file: reading")
struct ConfigurationReadingTests {
    @Test("Relays inherit [defaults]; their own keys win; allow/deny replace the defaults' lists")
    func inheritance() throws {
        let specs = try relays("""
            [defaults]
            connect_timeout = "2s"
            idle_timeout = "10m"
            drain_timeout = "2m"
            on_busy = "reject"
            max_connections = 50
            queue_limit = 7
            buffer_size = 65536
            upstream = "127.0.0.1:9000"
            allow = ["10.0.0.0/8"]

            [[relay]]
            name = "one"
            listen = "127.0.0.1:7000"

            [[relay]]
            name = "two"
            listen = "[::1]:7001"
            upstream = ["[::1]:9001", "backend.internal:9002"]
            egress = "ephemeral"
            on_busy = "queue"
            idle_timeout = "0"
            drain_timeout = "0"
            allow = ["::1"]
            deny = ["fd00::/8"]

            [[relay]]
            name = "three"
            listen = "127.0.0.1:7002"
            allow = []
            """)
        #expect(specs.count == 3)
        #expect(specs[2].access.isOpen, "an empty allow list drops the inherited one")
        let one = specs[0], two = specs[1]
        #expect(one.name == "one")
        #expect(one.listen == (try hostPort("127.0.0.1:7000")))
        #expect(one.upstreams == [try hostPort("127.0.0.1:9000")])
        #expect(one.egress == .samePort)
        #expect(one.onBusy == .reject)
        #expect(one.connectTimeout == .seconds(2))
        #expect(one.idleTimeout == .seconds(600))
        #expect(one.drainTimeout == .seconds(120))
        #expect(two.drainTimeout == .zero)
        #expect(specs[2].drainTimeout == .seconds(120))
        #expect(one.maxConnections == 50)
        #expect(one.queueLimit == 7)
        #expect(one.bufferSize == 65536)
        #expect(one.access == ClientAccess(allow: [try CIDR(parsing: "10.0.0.0/8")]))
        #expect(two.upstreams == [try hostPort("[::1]:9001"), try hostPort("backend.internal:9002")])
        #expect(two.egress == .ephemeral)
        #expect(two.onBusy == .queue)
        #expect(two.idleTimeout == nil)
        #expect(two.connectTimeout == .seconds(2))
        #expect(two.access == ClientAccess(allow: [try CIDR(parsing: "::1")], deny: [try CIDR(parsing: "fd00::/8")]))
    }

    @Test("A single relay needs no name, and gets the defaults of the command line")
    func singleRelay() throws {
        let specs = try relays("""
            [[relay]]
            listen = "*:7000"
            upstream = "127.0.0.1:9000"
            """)
        #expect(specs == [RelaySpec(name: "main", listen: try hostPort("*:7000"), upstreams: [try hostPort("127.0.0.1:9000")])])
    }

    @Test("An inline array of relay tables is read like [[relay]] headers")
    func inlineRelays() throws {
        let specs = try relays(#"relay = [{ name = "a", listen = "127.0.0.1:7000", upstream = "127.0.0.1:9000" }]"#)
        #expect(specs.map(\.name) == ["a"])
        #expect(problems(#"relay = [{ name = "a", listen = "127.0.0.1:7000" }]"#)
            == [#"f.toml:1:10: relay 'a' has no upstream: add upstream = "HOST:PORT" (or a list of them)"#])
    }
}

@Suite("Configuration file: every problem, with its position")
struct ConfigurationProblemTests {
    @Test("A syntax error is reported where the parser stopped")
    func syntax() {
        #expect(problems("[[relay]]\nname = \"a\nlisten = 1\n")
            == ["f.toml:2:10: syntax error: Error while parsing string: unescaped control characters other than TAB (U+0009) are explicitly prohibited"])
        #expect(problems("[[relay]]\nname = \"a\"\nname = \"b\"\n")
            == ["f.toml:3:8: syntax error: Error while parsing key-value pair: cannot redefine existing string 'name'"])
    }

    @Test("Input that stops TOMLKit's parser on an assertion gets a message instead (found by the mutation test)")
    func parserTraps() {
        #expect(problems("a = 1\n  [   # note\nb = 2\n")
            == ["f.toml:2:3: syntax error: a table header needs a name after its bracket: write [name] or [[name]]"])
        #expect(problems("[[ ]]\n") == ["f.toml:1:1: syntax error: a table header needs a name after its bracket: write [name] or [[name]]"])
        #expect(problems("[[relay]]\nallow = [}\"127.0.0.0/8\"]\n")
            == ["f.toml:2:10: syntax error: '}' cannot close the '[' opened at 2:9"])
        // Brackets inside strings and comments are not structure.
        #expect(problems("""
            [[relay]]
            name = "a" # ] } [
            listen = "127.0.0.1:7000"
            upstream = ['127.0.0.1:9000'] # [}
            """) == [])
    }

    @Test("Every bad element of a list is reported; the good ones are still checked")
    func everyElement() {
        #expect(problems("""
            [[relay]]
            listen = "127.0.0.1:7000"
            upstream = ["127.0.0.1:9000", "127.0.0.1", "*:9002", 5, "host:99999"]
            """) == [
            "f.toml:3:31: invalid address '127.0.0.1': the port is missing; expected IP:PORT, [IPv6]:PORT, *:PORT or HOST:PORT",
            "f.toml:3:44: invalid upstream '*:9002': '*' is for listening; name the upstream's host",
            "f.toml:3:54: 'upstream' must list strings; element 4 is an integer",
            "f.toml:3:57: invalid address 'host:99999': the port '99999' is not a number from 0 to 65535; expected IP:PORT, [IPv6]:PORT, *:PORT or HOST:PORT",
        ])
    }

    @Test("An upstream listed twice is reported at its second listing")
    func duplicateUpstream() {
        #expect(problems("""
            [[relay]]
            listen = "127.0.0.1:7000"
            upstream = ["127.0.0.1:9000", "127.0.0.1", "127.0.0.1:9001", "127.0.0.1:9000"]
            """) == [
            "f.toml:3:31: invalid address '127.0.0.1': the port is missing; expected IP:PORT, [IPv6]:PORT, *:PORT or HOST:PORT",
            "f.toml:3:62: upstream 127.0.0.1:9000 is listed twice: list each upstream once",
        ])
    }

    @Test("Positions survive a byte-order mark, a local date-time and a [relay.sub] table")
    func positions() {
        #expect(problems("\u{FEFF}[[relay]]\nlisten = \"127.0.0.1:7000\"\nupstream = \"127.0.0.1:9000\"\nmax_connections = 0\n")
            == ["f.toml:4:19: max connections must be from 1 to 1000000, not 0"])
        #expect(problems("""
            [[relay]]
            name = "a"
            when = 1979-05-27 07:32:00
            listen = "127.0.0.1:7000"
            upstream = "127.0.0.1:9000"

            [relay.extra]
            x = 1

            [[relay]]
            name = "b"
            listen = "127.0.0.1:7001"
            upstream = "127.0.0.1:9000"
            queue_limit = -5
            """) == [
            "f.toml:3:1: unknown key 'when' in [[relay]]; expected one of name, listen, upstream, egress, on_busy, connect_timeout, idle_timeout, keepalive, keepalive_interval, keepalive_count, user_timeout, drain_timeout, max_connections, max_per_client, queue_limit, buffer_size, allow, deny, splice, pipe_size, proxy_protocol, accept_proxy, accept_proxy_from, proxy_timeout, destinations, transparent",
            "f.toml:7:1: unknown key 'extra' in [[relay]]; expected one of name, listen, upstream, egress, on_busy, connect_timeout, idle_timeout, keepalive, keepalive_interval, keepalive_count, user_timeout, drain_timeout, max_connections, max_per_client, queue_limit, buffer_size, allow, deny, splice, pipe_size, proxy_protocol, accept_proxy, accept_proxy_from, proxy_timeout, destinations, transparent",
            "f.toml:14:15: the queue limit must be from 0 to 1000000, not -5",
        ])
    }

    @Test("Hints: quotes around a bare address, no quotes around a number, word order, IPv4-mapped listen, literal families")
    func hints() {
        #expect(problems("[[relay]]\nlisten = 127.0.0.1:7000\n")
            == [#"f.toml:2:12: syntax error: Error while parsing time: expected ':', saw '7'; listen takes a string: put the value in quotes, as in listen = "127.0.0.1:7000""#])
        #expect(problems("""
            [[relay]]
            listen = "[::ffff:127.0.0.1]:7000"
            upstream = "127.0.0.1:9000"
            max_connections = "1024"
            timeout_connect = "1s"
            lissten = "x"
            dest = "127.0.0.1/32"

            [[relay]]
            name = "six"
            listen = "[::1]:7001"
            upstream = ["127.0.0.1:9001", "127.0.0.2:9001"]
            """) == [
            "f.toml:1:1: relay #1 has no name: add name = \"...\" (with several relays each needs one; it names the relay in logs and matches its socket-activated fd)",
            "f.toml:2:10: invalid listen address '[::ffff:127.0.0.1]:7000': listen on 127.0.0.1:7000, not its IPv4-mapped form",
            "f.toml:4:19: 'max_connections' must be an integer, not a string: write max_connections = 1024, without quotes",
            "f.toml:5:1: unknown key 'timeout_connect' in [[relay]]; did you mean 'connect_timeout'?",
            "f.toml:6:1: unknown key 'lissten' in [[relay]]; did you mean 'listen'?",
            "f.toml:7:1: unknown key 'dest' in [[relay]]; expected one of name, listen, upstream, egress, on_busy, connect_timeout, idle_timeout, keepalive, keepalive_interval, keepalive_count, user_timeout, drain_timeout, max_connections, max_per_client, queue_limit, buffer_size, allow, deny, splice, pipe_size, proxy_protocol, accept_proxy, accept_proxy_from, proxy_timeout, destinations, transparent",
            "f.toml:12:12: no upstream has an IPv6 address to dial from ::1; give an IPv6 upstream, or listen on an address of the upstreams' family",
        ])
    }

    @Test("Unknown keys, with a hint for near misses")
    func unknownKeys() {
        #expect(problems("""
            [defaults]
            conect_timeout = "5s"

            [[relay]]
            listen = "127.0.0.1:7000"
            upstream = "127.0.0.1:9000"
              idle-timeout = "1m"
            colour = "blue"

            [relays]
            """) == [
            "f.toml:2:1: unknown key 'conect_timeout' in [defaults]; did you mean 'connect_timeout'?",
            "f.toml:7:3: unknown key 'idle-timeout' in [[relay]]; did you mean 'idle_timeout'?",
            "f.toml:8:1: unknown key 'colour' in [[relay]]; expected one of name, listen, upstream, egress, on_busy, connect_timeout, idle_timeout, keepalive, keepalive_interval, keepalive_count, user_timeout, drain_timeout, max_connections, max_per_client, queue_limit, buffer_size, allow, deny, splice, pipe_size, proxy_protocol, accept_proxy, accept_proxy_from, proxy_timeout, destinations, transparent",
            "f.toml:10:1: unknown table [relays] at the top level; did you mean [[relay]]?",
        ])
        #expect(problems("listen = \"127.0.0.1:7000\"\n[[relay]]\nlisten = \"127.0.0.1:7000\"\nupstream = \"127.0.0.1:1\"\n")
            == ["f.toml:1:1: 'listen' must be inside a [[relay]] table (or [defaults])"])
    }

    @Test("Values of the wrong type")
    func wrongTypes() {
        #expect(problems("""
            [[relay]]
            name = 7
            listen = ["127.0.0.1:7000"]
            upstream = ["127.0.0.1:9000", 9001]
            connect_timeout = 5
            max_connections = "10"
            queue_limit = 1.5
            allow = true
            deny = 7
            """) == [
            "f.toml:2:8: 'name' must be a string, not an integer",
            "f.toml:3:10: 'listen' must be a string, not a list",
            "f.toml:4:31: 'upstream' must list strings; element 2 is an integer",
            "f.toml:5:19: 'connect_timeout' must be a duration string such as \"5s\" or \"250ms\", not an integer",
            "f.toml:6:19: 'max_connections' must be an integer, not a string: write max_connections = 10, without quotes",
            "f.toml:7:15: 'queue_limit' must be an integer, not a floating-point number",
            "f.toml:8:9: 'allow' must be a string or a list of strings, not a boolean",
            "f.toml:9:8: 'deny' must be a string or a list of strings, not an integer",
        ])
    }

    @Test("Bad addresses, CIDRs, policies and durations, each at its value")
    func badValues() {
        #expect(problems("""
            [[relay]]
            listen = "127.0.0.1:7000"
            upstream = "127.0.0.1:9000"
            drain_timeout = 30
            """) == ["f.toml:4:17: 'drain_timeout' must be a duration string such as \"5s\" or \"250ms\", not an integer"])
        #expect(problems("""
            [[relay]]
            listen = "relay.example:7000"
            upstream = [
              "127.0.0.1:9000",
              "[::1:9001",
              "*:9002",
            ]
            egress = "sideways"
            on_busy = "maybe"
            idle_timeout = "5 parsecs"
            allow = ["10.0.0.0/8", "10.1.0.0/8"]
            deny = "::/200"
            """) == [
            "f.toml:2:10: invalid listen address 'relay.example:7000': listen on an IP address or *:PORT, not a host name",
            "f.toml:5:3: invalid address '[::1:9001': the '[' of an IPv6 address is not closed; expected IP:PORT, [IPv6]:PORT, *:PORT or HOST:PORT",
            "f.toml:6:3: invalid upstream '*:9002': '*' is for listening; name the upstream's host",
            "f.toml:8:10: invalid egress 'sideways': expected same-port, ephemeral, client, client-ip, or a local IP:PORT such as 127.0.0.1:7000",
            "f.toml:9:11: invalid on-busy policy 'maybe': expected queue, reject or ephemeral",
            "f.toml:10:16: invalid duration '5 parsecs': expected a number with a unit: ms, s, m or h (for example 250ms, 5s, 10m)",
            "f.toml:11:24: invalid CIDR '10.1.0.0/8': the address has bits set past the /8 prefix; did you mean 10.0.0.0/8?",
            "f.toml:12:8: invalid CIDR '::/200': the prefix length '200' is not a number from 0 to 128",
        ])
        #expect(problems("""
            [[relay]]
            listen = "127.0.0.1:7000"
            upstream = ["127.0.0.1:9000", "*:9002"]
            egress = "[::1]:7001"
            """) == [
            "f.toml:3:31: invalid upstream '*:9002': '*' is for listening; name the upstream's host",
            "f.toml:4:10: egress [::1]:7001 and listen 127.0.0.1:7000 are of different address families",
        ])
    }

    @Test("Numbers out of range, in a relay or in [defaults] (reported once)")
    func ranges() {
        #expect(problems("""
            [defaults]
            max_connections = 0
            connect_timeout = "0"

            [[relay]]
            name = "a"
            listen = "127.0.0.1:7000"
            upstream = "127.0.0.1:9000"
            buffer_size = 100
            queue_limit = -1

            [[relay]]
            name = "b"
            listen = "127.0.0.1:0"
            upstream = "127.0.0.1:9000"
            """) == [
            "f.toml:2:19: max connections must be from 1 to 1000000, not 0",
            "f.toml:3:19: the connect timeout must be above 0 (for example 5s)",
            "f.toml:9:15: the buffer size must be from 4096 to 16777216 bytes, not 100",
            "f.toml:10:15: the queue limit must be from 0 to 1000000, not -1",
            "f.toml:14:10: invalid listen address '127.0.0.1:0': the port must be from 1 to 65535",
        ])
    }

    @Test("Missing keys, names and listen addresses in [defaults], and the shape of the tables")
    func structure() {
        #expect(problems("""
            [defaults]
            name = "x"
            listen = "127.0.0.1:7000"

            [[relay]]
            upstream = "127.0.0.1:9000"

            [[relay]]
            name = "b"
            """) == [
            "f.toml:2:1: 'name' cannot be a default: each relay needs its own name",
            "f.toml:3:1: 'listen' cannot be a default: each relay needs its own listen",
            "f.toml:5:1: relay #1 has no listen address: add listen = \"IP:PORT\" (or \"*:PORT\")",
            "f.toml:5:1: relay #1 has no name: add name = \"...\" (with several relays each needs one; it names the relay in logs and matches its socket-activated fd)",
            "f.toml:8:1: relay 'b' has no listen address: add listen = \"IP:PORT\" (or \"*:PORT\")",
            "f.toml:8:1: relay 'b' has no upstream: add upstream = \"HOST:PORT\" (or a list of them)",
        ])
        #expect(problems("# nothing here\n") == ["f.toml:1:1: no [[relay]] table: define at least one relay, with listen and upstream"])
        #expect(problems("relay = []\n") == ["f.toml:1:1: no relay: 'relay' is an empty list; define at least one [[relay]] with listen and upstream"])
        #expect(problems("[[relay]]\nlisten = \"127.0.0.1:7000\"\nupstream = []\n") == ["f.toml:3:12: 'upstream' is an empty list: list at least one HOST:PORT"])
        #expect(problems("[relay]\nlisten = \"127.0.0.1:7000\"\n")
            == ["f.toml:1:1: 'relay' must be an array of tables: write [[relay]] (two brackets) above each relay"])
        #expect(problems("[[defaults]]\n[[relay]]\nlisten = \"127.0.0.1:7000\"\nupstream = \"127.0.0.1:1\"\n")
            == ["f.toml:1:1: 'defaults' must be a table: write [defaults] above its keys"])
    }

    @Test("Duplicate names and listen addresses that collide, wildcards included")
    func acrossRelays() {
        #expect(problems("""
            [defaults]
            upstream = "127.0.0.1:9000"

            [[relay]]
            name = "a"
            listen = "127.0.0.1:7000"

            [[relay]]
            name = "a"
            listen = "127.0.0.2:7000"

            [[relay]]
            name = "c"
            listen = "127.0.0.1:7000"

            [[relay]]
            name = "d"
            listen = "*:7000"

            [[relay]]
            name = "e"
            listen = "[::1]:7000"

            [[relay]]
            name = "f"
            listen = "127.0.0.1:7001"
            """) == [
            "f.toml:9:1: duplicate relay name 'a': relay #1 (line 4) already has it; give each relay its own name",
            "f.toml:14:1: relay 'c' listens on 127.0.0.1:7000, as relay 'a' (line 4) does; give each relay its own address or port",
            "f.toml:18:1: relay 'd' listens on *:7000, which overlaps relay 'a' (line 4) on 127.0.0.1:7000; give each relay its own address or port",
            "f.toml:18:1: relay 'd' listens on *:7000, which overlaps relay 'a' (line 8) on 127.0.0.2:7000; give each relay its own address or port",
            "f.toml:18:1: relay 'd' listens on *:7000, which overlaps relay 'c' (line 12) on 127.0.0.1:7000; give each relay its own address or port",
            "f.toml:22:1: relay 'e' listens on [::1]:7000, which overlaps relay 'd' (line 16) on *:7000; give each relay its own address or port",
            "f.toml:22:10: no upstream has an IPv6 address to dial from ::1; give an IPv6 upstream, or listen on an address of the upstreams' family",
        ])
        #expect(problems("""
            [defaults]
            upstream = "127.0.0.1:9000"
            [[relay]]
            listen = "127.0.0.1:7000"
            [[relay]]
            listen = "127.0.0.1:7000"
            """) == [
            "f.toml:3:1: relay #1 has no name: add name = \"...\" (with several relays each needs one; it names the relay in logs and matches its socket-activated fd)",
            "f.toml:5:1: relay #2 has no name: add name = \"...\" (with several relays each needs one; it names the relay in logs and matches its socket-activated fd)",
            "f.toml:6:1: relay #2 listens on 127.0.0.1:7000, as relay #1 (line 3) does; give each relay its own address or port",
        ])
    }
}

@Suite("Configuration file: the examples and random damage")
struct ConfigurationExampleTests {
    static let configDirectory: String = {
        // Tests/SamePortConfigTests/ConfigurationTests.swift -> the package root.
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)
        return parts.joined(separator: "/") + "/Config"
    }()

    static func read(_ path: String) throws -> String {
        guard let file = fopen(path, "r") else { throw TestFailure("cannot open \(path)") }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = fread(&chunk, 1, chunk.count, file)
            if count <= 0 { break }
            bytes.append(contentsOf: chunk[..<count])
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    @Test("The documented example sets every key a relay can have")
    func everyKey() throws {
        let text = try Self.read(Self.configDirectory + "/sameport.toml")
        for key in RelayKey.allCases {
            #expect(text.contains("\n\(key.rawValue) = "), "Config/sameport.toml does not show '\(key.rawValue)'")
        }
        #expect(try Configuration(text: text, path: "sameport.toml").relays.count >= 2)
    }

    @Test("1,000 random mutations of the example: never a crash, always valid or a located problem")
    func mutations() throws {
        let original = Array(try Self.read(Self.configDirectory + "/sameport.toml").unicodeScalars)
        // SAMEPORT_FUZZ_ROUNDS and SAMEPORT_FUZZ_SEED run a longer search by hand.
        let environment = ProcessInfo.processInfo.environment
        let rounds = environment["SAMEPORT_FUZZ_ROUNDS"].flatMap { Int($0) } ?? 1000
        var random = SplitMix(seed: environment["SAMEPORT_FUZZ_SEED"].flatMap { UInt64($0) } ?? 0x5a3e_9017)
        let alphabet = Array("[]{}\"'=#,.\n \t\\0123456789abcxyz_-:/*".unicodeScalars) + ["é", "\u{0}"]
        var valid = 0
        for round in 0..<rounds {
            var text = original
            for _ in 0...(random.next() % 3) {
                guard !text.isEmpty else { break }
                let at = Int(random.next() % UInt64(text.count))
                switch random.next() % 4 {
                case 0: text.remove(at: at)
                case 1: text.insert(alphabet[Int(random.next() % UInt64(alphabet.count))], at: at)
                case 2: text[at] = alphabet[Int(random.next() % UInt64(alphabet.count))]
                default:
                    let length = min(Int(random.next() % 40), text.count - at)
                    let slice = Array(text[at..<(at + length)])
                    text.insert(contentsOf: slice, at: Int(random.next() % UInt64(text.count)))
                }
            }
            var string = ""
            string.unicodeScalars.append(contentsOf: text)
            if environment["SAMEPORT_FUZZ_ROUNDS"] != nil {
                _ = try? string.write(toFile: "/tmp/sameport-fuzz-last.toml", atomically: false, encoding: .utf8)
            }
            let lineCount = string.split(separator: "\n", omittingEmptySubsequences: false).count
            do {
                let configuration = try Configuration(text: string, path: "m.toml")
                #expect(!configuration.relays.isEmpty, "round \(round): valid but no relay")
                valid += 1
            } catch {
                #expect(!error.problems.isEmpty, "round \(round): invalid without a problem")
                for problem in error.problems {
                    #expect((1...lineCount + 1).contains(problem.position.line) && problem.position.column >= 1,
                            "round \(round): \(problem) is outside the file")
                    #expect(!problem.message.isEmpty)
                }
            }
        }
        // Most single edits land in comments and stay valid; many do not. Both answers must occur.
        #expect(valid > rounds / 20 && valid < rounds, "valid: \(valid)")
    }
}

/// A small deterministic generator, so that a failing mutation can be replayed.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
