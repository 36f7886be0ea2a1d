import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// What a user sees: help, version, one-line errors with exit codes, signals, log formats.
@Suite("Command line", .serialized)
struct CommandLineTests {
    /// Runs sameport to completion; its exit status and output.
    private func run(_ arguments: [String], prefix: [String] = [], executable: String = RelayProcess.binary) throws -> (status: Int32?, output: String) {
        let process = try RelayProcess(arguments, prefix: prefix, executable: executable)
        let status = process.waitForExit(timeout: .seconds(20))
        if status == nil { process.stop(signal: SIGKILL) }
        return (status, process.output)
    }

    @Test("Too few descriptors for the event loops: exit 2 and one line with the cure, not an abort")
    func eventLoopsCannotStart() throws {
        let (status, output) = try run(
            ["--listen", "127.0.0.1:\(try freePort())", "--upstream", "127.0.0.1:9", "--threads", "64"],
            prefix: ["prlimit", "--nofile=40"])
        #expect(status == 2, "\(output)")
        // epoll_create1 or eventfd, whichever finds the limit first.
        #expect(output.hasPrefix("sameport: cannot start: cannot start the event loops: "), "\(output)")
        #expect(output.hasSuffix(": Too many open files (errno 24): each event loop needs 2 descriptors: raise the limit on open files (LimitNOFILE=, ulimit -n) or lower --threads\n"), "\(output)")
        #expect(output.split(separator: "\n").count == 1)
    }

    @Test("Malformed input: exit 2 and one line that names the cause", arguments: [
        (["--listen", "127.0.0.1", "--upstream", "127.0.0.1:9"],
         "sameport: usage error: invalid address '127.0.0.1': the port is missing; expected IP:PORT, [IPv6]:PORT, *:PORT or HOST:PORT (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "300.1.1.1:80"],
         "sameport: usage error: invalid address '300.1.1.1:80': '300.1.1.1' is neither an IP address nor a host name; expected IP:PORT, [IPv6]:PORT, *:PORT or HOST:PORT (see 'sameport --help')"),
        (["--listen", "::1:7000", "--upstream", "127.0.0.1:9"],
         "sameport: usage error: invalid address '::1:7000': an IPv6 address needs brackets, as in [::1]:8080; expected IP:PORT, [IPv6]:PORT, *:PORT or HOST:PORT (see 'sameport --help')"),
        (["--listen", "127.0.0.1:70000", "--upstream", "127.0.0.1:9"],
         "sameport: usage error: invalid address '127.0.0.1:70000': the port '70000' is not a number from 0 to 65535; expected IP:PORT, [IPv6]:PORT, *:PORT or HOST:PORT (see 'sameport --help')"),
        (["--listen", "relay.example:7000", "--upstream", "127.0.0.1:9"],
         "sameport: usage error: invalid listen address 'relay.example:7000': listen on an IP address or *:PORT, not a host name (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000"],
         "sameport: usage error: missing --upstream HOST:PORT: where to relay clients to (see 'sameport --help')"),
        (["--upstream", "127.0.0.1:9"],
         "sameport: usage error: missing --listen ADDR:PORT (or --config FILE): the address to accept clients on (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--listen", "127.0.0.1:7001"],
         "sameport: usage error: --listen given 2 times (127.0.0.1:7000, 127.0.0.1:7001): a relay listens on one address; for several, write a configuration file with a [[relay]] for each (--config) (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--upstream", "127.0.0.1:10", "--upstream", "127.0.0.1:9"],
         "sameport: usage error: upstream 127.0.0.1:9 is listed twice: list each upstream once (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--allow", "10.0.0.0/33"],
         "sameport: usage error: invalid CIDR '10.0.0.0/33': the prefix length '33' is not a number from 0 to 32 (see 'sameport --help')"),
        (["--config", "Config/sameport.toml", "--listen", "127.0.0.1:7000", "--egress", "ephemeral"],
         "sameport: usage error: --config cannot be mixed with --listen, --egress: put the relay's settings in Config/sameport.toml, or drop --config (see 'sameport --help')"),
        (["--config", "Config/sameport.toml", "--reload-timeout", "0"],
         "sameport: usage error: --reload-timeout must be above 0: a reload needs some time to read the file (see 'sameport --help')"),
        (["--config", "/nonexistent.toml", "--reload-timeout", "5x"],
         "sameport: usage error: --reload-timeout: invalid duration '5x': expected a number with a unit: ms, s, m or h (for example 250ms, 5s, 10m) (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--reload-timeout", "5s"],
         "sameport: usage error: --reload-timeout needs --config FILE: a relay from flags has no file to reload (see 'sameport --help')"),
        (["check"],
         "sameport: usage error: missing the file to check: sameport check --config FILE (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--egress", "::1:7001"],
         "sameport: usage error: invalid egress '::1:7001': an IPv6 address needs brackets, as in [::1]:8080; expected same-port, ephemeral, client, client-ip, or a local IP:PORT such as 127.0.0.1:7000 (see 'sameport --help')"),
        (["--listen", "[::ffff:127.0.0.1]:7000", "--upstream", "127.0.0.1:9"],
         "sameport: usage error: invalid listen address '[::ffff:127.0.0.1]:7000': listen on 127.0.0.1:7000, not its IPv4-mapped form (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--bogus"],
         "sameport: usage error: Unknown option '--bogus' (see 'sameport --help')"),
        (["run", "--bogus"],
         "sameport: usage error: Unknown option '--bogus' (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--connect-timeout", "5parsecs"],
         "sameport: usage error: invalid duration '5parsecs': expected a number with a unit: ms, s, m or h (for example 250ms, 5s, 10m) (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--connect-timeout", "-5s"],
         "sameport: usage error: invalid duration '-5s': a duration cannot be negative: give 0 or more, for example 5s (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--idle-timeout", "-1m"],
         "sameport: usage error: invalid duration '-1m': a duration cannot be negative: give 0 or more, for example 5s (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--max-connections", "-1"],
         "sameport: usage error: max connections must be from 1 to 1000000, not -1 (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--keepalive", "1.5s"],
         "sameport: usage error: the keepalive idle time must be whole seconds from 1s to 32767s (the kernel counts it in seconds; 0 turns keepalive off), not 1.5s (see 'sameport --help')"),
        (["--config", "Config/sameport.toml", "--reload-timeout", "-5s"],
         "sameport: usage error: --reload-timeout: invalid duration '-5s': a duration cannot be negative: give 0 or more, for example 5s (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--egress", "nowhere"],
         "sameport: usage error: invalid egress 'nowhere': expected same-port, ephemeral, client, client-ip, or a local IP:PORT such as 127.0.0.1:7000 (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--on-busy", "maybe"],
         "sameport: usage error: invalid on-busy policy 'maybe': expected queue, reject or ephemeral (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--max-connections", "0"],
         "sameport: usage error: max connections must be from 1 to 1000000, not 0 (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--splice", "maybe"],
         "sameport: usage error: invalid splice setting 'maybe': expected on or off (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--pipe-size", "1000"],
         "sameport: usage error: the pipe size must be from 4096 to 16777216 bytes, not 1000 (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--splice-after", "2000000000"],
         "sameport: usage error: the splice threshold must be from 0 to 1073741824 bytes, not 2000000000 (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--log-format", "xml"],
         "sameport: usage error: invalid log format 'xml': expected text or json (see 'sameport --help')"),
        // A flag the others make a no-op is refused rather than silently ignored.
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--proxy-timeout", "3s"],
         "sameport: usage error: --proxy-timeout has no effect without --accept-proxy (it bounds the wait for a client's PROXY header): add --accept-proxy and --accept-proxy-from, or drop --proxy-timeout (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--splice", "off", "--pipe-size", "65536"],
         "sameport: usage error: --pipe-size has no effect with --splice off: drop --pipe-size, or leave splicing on (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--keepalive", "0", "--keepalive-count", "3"],
         "sameport: usage error: --keepalive-count has no effect with --keepalive 0 (keepalive off): drop --keepalive-count, or give --keepalive a duration such as 60s (see 'sameport --help')"),
        (["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:9", "--on-busy", "reject", "--queue-limit", "5"],
         "sameport: usage error: --queue-limit has no effect with --on-busy reject (no client waits in a queue): drop --queue-limit, or use --on-busy queue (see 'sameport --help')"),
    ])
    func malformed(arguments: [String], message: String) throws {
        let (status, output) = try run(arguments)
        #expect(status == 2)
        #expect(output == message + "\n")
    }

    @Test("An unresolvable upstream is a configuration error, exit 2")
    func unresolvable() throws {
        let port = try freePort()
        let (status, output) = try run(["--listen", "127.0.0.1:\(port)", "--upstream", "no-such-host.invalid:80"])
        #expect(status == 2)
        #expect(output.hasPrefix("sameport: configuration error: cannot resolve upstream 'no-such-host.invalid:80': "))
        #expect(output.hasSuffix("; check the name or give an IP address\n"))
    }

    @Test("An IPv4 listener with only IPv6 upstreams is refused before start-up")
    func familyMismatch() throws {
        let port = try freePort()
        let (status, output) = try run(["--listen", "127.0.0.1:\(port)", "--upstream", "[::1]:9"])
        #expect(status == 2)
        #expect(output == "sameport: usage error: no upstream has an IPv4 address to dial from 127.0.0.1; give an IPv4 upstream, or listen on an address of the upstreams' family (see 'sameport --help')\n")
    }

    @Test("The listen port in use by another process: exit 2, cause and fix")
    func portInUse() throws {
        let other = try TestServer(handler: TestServer.hold)
        defer { other.stop() }
        let (status, output) = try run(["--listen", other.endpoint.description, "--upstream", "127.0.0.1:9"])
        #expect(status == 2)
        #expect(output == "sameport: cannot start: cannot listen on \(other.endpoint): Address already in use: another socket holds port \(other.endpoint.port) (a listener, or a connection using it as its local port: ss -tanp 'sport = :\(other.endpoint.port)' shows which); stop its process or choose another listen port\n")
    }

    @Test("The listen port held by a connection (its local port), not a listener: the message does not claim a listener")
    func portHeldByConnection() throws {
        let server = try TestServer(handler: TestServer.hold)
        defer { server.stop() }
        let connection = try TestSocket.connect(to: server.endpoint)
        defer { connection.close() }
        let held = try #require(connection.localEndpoint)
        let (status, output) = try run(["--listen", held.description, "--upstream", "127.0.0.1:9"])
        #expect(status == 2)
        #expect(output == "sameport: cannot start: cannot listen on \(held): Address already in use: another socket holds port \(held.port) (a listener, or a connection using it as its local port: ss -tanp 'sport = :\(held.port)' shows which); stop its process or choose another listen port\n")
    }

    @Test("The listen port in use by another sameport (SO_REUSEPORT on both): refused, not shared")
    func portInUseBySameport() throws {
        let (first, listen) = try startRelay(upstreams: ["127.0.0.1:9"])
        defer { first.stop() }
        let (status, output) = try run(["--listen", listen.description, "--upstream", "127.0.0.1:9"])
        #expect(status == 2)
        #expect(output.contains("cannot listen on \(listen): Address already in use"))
    }

    @Test("A port below 1024 without the privilege: exit 2 and the cure")
    func lowPortWithoutPermission() throws {
        // Run as nobody, from a copy of the binary that nobody may execute.
        let binary = try NobodyBinary()
        let (status, output) = try run(
            ["--listen", "127.0.0.1:80", "--upstream", "127.0.0.1:9"], prefix: NobodyBinary.prefix, executable: binary.path)
        #expect(status == 2)
        #expect(output == "sameport: cannot start: cannot listen on 127.0.0.1:80: Permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE (for the egress sockets too); grant it (setcap cap_net_bind_service=+ep, or AmbientCapabilities= under systemd) or listen on a port from 1024 up\n")
    }

    @Test("--help reads like a man page; --version prints the version")
    func helpAndVersion() throws {
        let (status, help) = try run(["--help"])
        #expect(status == 0)
        for needle in ["USAGE: sameport run", "--listen <addr:port>", "--upstream <host:port>", "--egress <mode>",
                       "--on-busy <policy>", "--connect-timeout <duration>", "--idle-timeout <duration>",
                       "--keepalive <duration>", "--keepalive-interval <duration>", "--keepalive-count <n>",
                       "--user-timeout <duration>", "--max-per-client <n>",
                       "--max-connections <n>", "--splice <on|off>", "--pipe-size <bytes>", "--log-format <format>", "EXIT STATUS", "EXAMPLES", "4-tuple"] {
            #expect(help.contains(needle), "help lacks \(needle)")
        }
        let (runStatus, runHelp) = try run(["run", "--help"])
        #expect(runStatus == 0)
        #expect(runHelp.contains("USAGE: sameport run"))
        let (versionStatus, version) = try run(["--version"])
        #expect(versionStatus == 0)
        // The number, and the commit when built from a checkout (PackagingTests: the number is the
        // Debian changelog's).
        #expect(version.wholeMatch(of: /\d+\.\d+\.\d+( \(git [0-9a-f]{7,40}(-dirty)?\))?\n/) != nil, "\(version)")
    }

    @Test("SIGINT, and SIGTERM with --drain-timeout 0, stop at once with exit 0; open connections end as shutdown", arguments: [SIGTERM, SIGINT])
    func signals(signal: Int32) throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description], signal == SIGTERM ? ["--drain-timeout", "0"] : [])
        let client = try TestSocket.connect(to: listen)
        try client.sendAll(Array("x".utf8))
        #expect(try client.receive(exactly: 1, timeout: .seconds(5)).bytes == Array("x".utf8))
        #expect(relay.stop(signal: signal) == 0)
        #expect(relay.output.contains("stopping on \(signal == SIGTERM ? "SIGTERM" : "SIGINT")"))
        #expect(relay.lines(containing: "end=shutdown").count == 1)
        #expect(try client.waitForEnd(timeout: .seconds(5)) == .reset, "a stream cut by the stop is reset, not ended")
    }

    @Test("A signal sent the moment the relay says it listens is never lost: 20 starts, SIGHUP handled or SIGTERM obeyed each time")
    func signalsRightAfterStart() throws {
        // libdispatch's signal sources left a window at start-up in which a signal met SIG_IGN:
        // 1 signal in 6 sent at once was lost (a SIGTERM so lost would wait for systemd's SIGKILL).
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let listen = Endpoint(.loopbackV4, try freePort())
        for round in 0..<20 {
            let relay = try RelayProcess(["--listen", listen.description, "--upstream", upstream.endpoint.description])
            defer { relay.stop() }
            try relay.waitUntilListening()
            if round % 2 == 0 {
                kill(relay.pid, SIGHUP)
                #expect(throws: Never.self, "round \(round): SIGHUP lost") {
                    try relay.waitForLines(containing: "SIGHUP: nothing to reload", timeout: .seconds(3))
                }
                #expect(relay.stop() == 0)
            } else {
                kill(relay.pid, SIGTERM)
                #expect(relay.waitForExit(timeout: .seconds(3)) == 0, "round \(round): SIGTERM lost")
            }
        }
    }

    @Test("SIGHUP does not stop a relay run from flags")
    func hangup() throws {
        let (upstream, relay, listen) = try startEchoRelay()
        defer { relay.stop(); upstream.stop() }
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "SIGHUP: nothing to reload")
        let client = try TestSocket.connect(to: listen)
        try client.sendAll(Array("still here".utf8))
        #expect(try client.receive(exactly: 10, timeout: .seconds(5)).bytes == Array("still here".utf8))
        #expect(relay.isRunning)
    }

    @Test("--log-format json: one JSON object per line with the connection's fields")
    func jsonLogs() throws {
        let (upstream, relay, listen) = try startEchoRelay(["--log-format", "json"])
        defer { relay.stop(); upstream.stop() }
        let client = try TestSocket.connect(to: listen)
        try client.sendAll(Array("json".utf8))
        _ = try client.receive(exactly: 4, timeout: .seconds(5))
        client.close()
        let line = try relay.waitForLines(containing: "connection ended")[0]
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(object["msg"] as? String == "connection ended")
        #expect(object["level"] as? String == "info")
        #expect(object["egress"] as? String == listen.description)
        // Counts are JSON numbers, so that `jq 'select(.bytes_to_upstream > 1000)'` works.
        #expect(object["bytes_to_upstream"] as? Int == 4)
        #expect(object["bytes_to_client"] as? Int == 4)
        // The duration in seconds, as a number too (text lines say "0.001s").
        let duration = try #require(object["duration"] as? Double, "\(line)")
        #expect(duration >= 0 && duration < 5 && !line.contains("\"duration\":\""), "\(line)")
        #expect(object["end"] as? String == "completed")
        // The start-up line names the relay and its listen address as keys too.
        let started = try relay.waitForLines(containing: "listening on")[0]
        let start = try #require(try JSONSerialization.jsonObject(with: Data(started.utf8)) as? [String: Any])
        #expect(start["relay"] as? String == "main" && start["listen"] as? String == listen.description, "\(started)")
        #expect(relay.output.split(separator: "\n").allSatisfy { $0.hasPrefix("{") && $0.hasSuffix("}") })
    }
}
