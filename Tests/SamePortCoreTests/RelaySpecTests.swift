import SamePortCore
import Testing

private func hostPort(_ text: String) throws -> HostPort {
    try HostPort(parsing: text)
}

/// A valid spec: 127.0.0.1:7000 forwarding to 127.0.0.1:8000.
private func validSpec() throws -> RelaySpec {
    RelaySpec(listen: try hostPort("127.0.0.1:7000"), upstreams: [try hostPort("127.0.0.1:8000")])
}

/// Asserts that `spec` has exactly one problem and that it contains `fragment`.
private func expectOneProblem(
    _ spec: RelaySpec, containing fragment: String, sourceLocation: SourceLocation = #_sourceLocation
) {
    let problems = spec.problems()
    #expect(problems.count == 1, "problems: \(problems)", sourceLocation: sourceLocation)
    #expect(problems.first?.contains(fragment) == true, "problems: \(problems)", sourceLocation: sourceLocation)
}

@Suite("RelaySpec.problems")
struct RelaySpecTests {
    @Test("a valid spec has no problems")
    func valid() throws {
        let spec = try validSpec()
        #expect(spec.problems() == [])
        #expect(spec.name == "main")
        #expect(spec.egress == .samePort)
        #expect(spec.onBusy == .queue)
        #expect(spec.connectTimeout == .seconds(5))
        #expect(spec.idleTimeout == nil)
        #expect(spec.maxConnections == 1024)
        #expect(spec.queueLimit == 128)
        #expect(spec.bufferSize == 131_072)
        #expect(spec.splice == .on)
        #expect(spec.pipeSize == 1_048_576)
        #expect(spec.spliceAfter == 262_144)
    }

    @Test("valid variations have no problems")
    func validVariations() throws {
        var spec = try validSpec()
        spec.listen = try hostPort("*:7000")
        spec.upstreams = [try hostPort("example.org:80"), try hostPort("[::1]:8000"), try hostPort("10.0.0.1:65535")]
        spec.name = "a.b-c_D9"
        spec.egress = .fixed(Endpoint(.loopbackV6, 7001))
        spec.idleTimeout = .zero
        spec.queueLimit = 0
        spec.maxConnections = 1_000_000
        spec.bufferSize = 4096
        spec.pipeSize = 4096
        spec.spliceAfter = 0
        spec.splice = .off
        #expect(spec.problems() == [])
        spec.bufferSize = 16 << 20
        spec.pipeSize = 16 << 20
        spec.spliceAfter = 1 << 30
        spec.maxConnections = 1
        spec.queueLimit = 1_000_000
        #expect(spec.problems() == [])
    }

    @Test("listening on a host name")
    func listenHostName() throws {
        var spec = try validSpec()
        spec.listen = try hostPort("localhost:7000")
        #expect(
            spec.problems()
                == ["invalid listen address 'localhost:7000': listen on an IP address or *:PORT, not a host name"]
        )
    }

    @Test("listening on port 0")
    func listenPortZero() throws {
        var spec = try validSpec()
        spec.listen = try hostPort("127.0.0.1:0")
        #expect(spec.problems() == ["invalid listen address '127.0.0.1:0': the port must be from 1 to 65535"])
    }

    @Test("no upstream")
    func noUpstream() throws {
        var spec = try validSpec()
        spec.upstreams = []
        expectOneProblem(spec, containing: "no upstream: give at least one --upstream HOST:PORT")
    }

    @Test("a wildcard upstream")
    func wildcardUpstream() throws {
        var spec = try validSpec()
        spec.upstreams = [try hostPort("*:80")]
        expectOneProblem(spec, containing: "invalid upstream '*:80': '*' is for listening")
        // A wildcard with port 0 is reported once, for the wildcard.
        spec.upstreams = [try hostPort("*:0")]
        expectOneProblem(spec, containing: "'*' is for listening")
    }

    @Test("an upstream listed twice")
    func duplicateUpstream() throws {
        var spec = try validSpec()
        spec.upstreams = [try hostPort("127.0.0.1:9000"), try hostPort("127.0.0.1:9001"), try hostPort("127.0.0.1:9000")]
        expectOneProblem(spec, containing: "upstream 127.0.0.1:9000 is listed twice: list each upstream once")
        #expect(spec.fieldProblems().map(\.field) == [.upstream(index: 2)])
    }

    @Test("an upstream on port 0")
    func upstreamPortZero() throws {
        var spec = try validSpec()
        spec.upstreams = [try hostPort("127.0.0.1:8000"), try hostPort("example.org:0")]
        expectOneProblem(spec, containing: "invalid upstream 'example.org:0': the port must be from 1 to 65535")
    }

    @Test("every bad upstream is reported")
    func severalBadUpstreams() throws {
        var spec = try validSpec()
        spec.upstreams = [try hostPort("*:80"), try hostPort("127.0.0.1:8000"), try hostPort("[::1]:0")]
        let problems = spec.problems()
        #expect(problems.count == 2)
        #expect(problems.first?.contains("'*:80'") == true)
        #expect(problems.last?.contains("'[::1]:0'") == true)
    }

    @Test("a zero or negative connect timeout", arguments: [Duration.zero, .milliseconds(-1)])
    func connectTimeout(timeout: Duration) throws {
        var spec = try validSpec()
        spec.connectTimeout = timeout
        expectOneProblem(spec, containing: "the connect timeout must be above 0")
    }

    @Test("a negative idle timeout")
    func negativeIdleTimeout() throws {
        var spec = try validSpec()
        spec.idleTimeout = .seconds(-1)
        expectOneProblem(spec, containing: "the idle timeout cannot be negative")
    }

    @Test("max connections out of range", arguments: [0, -1, 1_000_001])
    func maxConnections(value: Int) throws {
        var spec = try validSpec()
        spec.maxConnections = value
        expectOneProblem(spec, containing: "max connections must be from 1 to 1000000, not \(value)")
    }

    @Test("queue limit out of range", arguments: [-1, 1_000_001])
    func queueLimit(value: Int) throws {
        var spec = try validSpec()
        spec.queueLimit = value
        expectOneProblem(spec, containing: "the queue limit must be from 0 to 1000000, not \(value)")
    }

    @Test("buffer size out of range", arguments: [1, 0, 4095, (16 << 20) + 1])
    func bufferSize(value: Int) throws {
        var spec = try validSpec()
        spec.bufferSize = value
        expectOneProblem(spec, containing: "the buffer size must be from 4096 to 16777216 bytes, not \(value)")
    }

    @Test("pipe size out of range", arguments: [1, 0, 4095, (16 << 20) + 1])
    func pipeSize(value: Int) throws {
        var spec = try validSpec()
        spec.pipeSize = value
        expectOneProblem(spec, containing: "the pipe size must be from 4096 to 16777216 bytes, not \(value)")
    }

    @Test("splice threshold out of range", arguments: [-1, (1 << 30) + 1])
    func spliceAfter(value: Int) throws {
        var spec = try validSpec()
        spec.spliceAfter = value
        expectOneProblem(spec, containing: "the splice threshold must be from 0 to 1073741824 bytes, not \(value)")
    }

    @Test("bad relay names", arguments: ["", "my relay", "relay/1", "relé", "a:b"])
    func badName(name: String) throws {
        var spec = try validSpec()
        spec.name = name
        expectOneProblem(spec, containing: "invalid relay name '\(name)'")
    }

    @Test("egress and listen of different families")
    func familyMismatch() throws {
        var spec = try validSpec()
        spec.egress = .fixed(Endpoint(.loopbackV6, 7001))
        #expect(spec.problems() == ["egress [::1]:7001 and listen 127.0.0.1:7000 are of different address families"])

        spec.listen = try hostPort("[::1]:7000")
        spec.egress = .fixed(Endpoint(.loopbackV4, 7001))
        expectOneProblem(spec, containing: "are of different address families")

        // Same family: fine, once an upstream of that family is given.
        spec.egress = .fixed(Endpoint(.loopbackV6, 7001))
        #expect(spec.problems() == ["no upstream has an IPv6 address to dial from ::1; give an IPv6 upstream, or listen on an address of the upstreams' family"])
        spec.upstreams.append(try hostPort("[::1]:9000"))
        #expect(spec.problems() == [])
        // A host name may resolve to either family: checked once resolved, not here.
        spec.upstreams = [try hostPort("backend.example:9000")]
        #expect(spec.problems() == [])
        // A wildcard listen address accepts either family.
        spec.upstreams = [try hostPort("127.0.0.1:9000")]
        spec.egress = .samePort
        spec.listen = try hostPort("*:7000")
        #expect(spec.problems() == [])
        spec.listen = try hostPort("0.0.0.0:7000")
        #expect(spec.problems() == [])
        // An IPv4-mapped listen address is refused, with the plain IPv4 form to use.
        spec.listen = try hostPort("[::ffff:127.0.0.1]:7000")
        #expect(spec.problems() == ["invalid listen address '[::ffff:127.0.0.1]:7000': listen on 127.0.0.1:7000, not its IPv4-mapped form"])
    }

    @Test("every problem is reported at once")
    func allProblems() throws {
        let spec = RelaySpec(
            name: "",
            listen: try hostPort("localhost:0"),
            upstreams: [],
            connectTimeout: .zero,
            idleTimeout: .seconds(-1),
            maxConnections: 0,
            queueLimit: -1,
            bufferSize: 1,
            pipeSize: 1
        )
        #expect(
            spec.problems() == [
                "invalid relay name '': use ASCII letters, digits, '-', '_' or '.'",
                "invalid listen address 'localhost:0': listen on an IP address or *:PORT, not a host name",
                "invalid listen address 'localhost:0': the port must be from 1 to 65535",
                "no upstream: give at least one --upstream HOST:PORT",
                "the connect timeout must be above 0 (for example 5s)",
                "the idle timeout cannot be negative (0 turns it off)",
                "max connections must be from 1 to 1000000, not 0",
                "the queue limit must be from 0 to 1000000, not -1",
                "the buffer size must be from 4096 to 16777216 bytes, not 1",
                "the pipe size must be from 4096 to 16777216 bytes, not 1",
            ]
        )
    }
}
