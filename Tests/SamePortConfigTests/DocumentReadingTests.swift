import SamePortConfig
import SamePortCore
import Testing

/// The document is copied out of TOMLKit's tree into Swift values (`TOMLNode`) before the tree is
/// freed: every TOML type must come out as what it was.
@Suite("Configuration file: the parsed document")
struct DocumentReadingTests {
    @Test("Strings with escapes, integers in hex, octal and with underscores, booleans, and inline tables in an array are read as written")
    func values() throws {
        let configuration = try Configuration(text: #"""
            threads = 0x4
            [defaults]
            max_connections = 1_000
            queue_limit = 0o17
            splice = false
            [[relay]]
            name = "m\u0061in-\U00000031"
            listen = '127.0.0.1:7000'
            upstream = ["""127.0.0.1:9000"""]
            """#, path: "f.toml")
        #expect(configuration.threads == 4)
        let spec = try #require(configuration.relays.first)
        #expect(spec.name == "main-1")
        #expect(spec.maxConnections == 1000)
        #expect(spec.queueLimit == 15)
        #expect(spec.splice == .off)
        #expect(spec.upstreams.map(\.description) == ["127.0.0.1:9000"])
        let inline = try Configuration(text: #"relay = [{ name = "a", listen = "127.0.0.1:7000", upstream = "127.0.0.1:9000" }, { name = "b", listen = "127.0.0.1:7001", upstream = "127.0.0.1:9000" }]"#, path: "f.toml")
        #expect(inline.relays.map(\.name) == ["a", "b"])
    }

    @Test("Floats, dates, times, date-times (with and without an offset) and tables are named in the message")
    func kinds() {
        #expect(problems("""
            [[relay]]
            listen = "127.0.0.1:7000"
            upstream = "127.0.0.1:9000"
            max_connections = 1979-05-27
            queue_limit = 07:32:00
            buffer_size = 1979-05-27T07:32:00Z
            pipe_size = 1979-05-27T07:32:00
            name = { first = "a" }
            connect_timeout = 2.5
            """) == [
            "f.toml:4:19: 'max_connections' must be an integer, not a date or time",
            "f.toml:5:15: 'queue_limit' must be an integer, not a date or time",
            "f.toml:6:15: 'buffer_size' must be an integer, not a date or time",
            "f.toml:7:13: 'pipe_size' must be an integer, not a date or time",
            "f.toml:8:8: 'name' must be a string, not a table",
            "f.toml:9:19: 'connect_timeout' must be a duration string such as \"5s\" or \"250ms\", not a floating-point number",
        ])
    }
}
