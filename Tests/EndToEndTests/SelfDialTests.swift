import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// Runs sameport to completion within `timeout`: its exit status and output.
private func runToExit(_ arguments: [String], prefix: [String] = [], timeout: Duration = .seconds(20)) throws -> (status: Int32?, output: String) {
    let process = try RelayProcess(arguments, prefix: prefix)
    let status = process.waitForExit(timeout: timeout)
    if status == nil { process.stop(signal: SIGKILL) }
    return (status, process.output)
}

/// A relay whose upstream is its own listener: refused when it can be known, and caught at the
/// dial when it cannot (it echoed its clients, or dialled itself until max_connections ran out).
@Suite("A relay that would dial itself", .serialized)
struct SelfDialTests {
    @Test("An upstream equal to --listen: exit 2 and one line naming cause and fix")
    func literal() throws {
        let port = try freePort()
        let (status, output) = try runToExit(["--listen", "127.0.0.1:\(port)", "--upstream", "127.0.0.1:\(port)"])
        #expect(status == 2)
        #expect(output == "sameport: usage error: upstream 127.0.0.1:\(port) is the relay's own listen address 127.0.0.1:\(port): the relay would dial itself; give the upstream's own address, or listen on another port (see 'sameport --help')\n")
        // A wildcard listener takes every loopback address.
        let (wildStatus, wildOutput) = try runToExit(["--listen", "*:\(port)", "--upstream", "127.0.0.2:\(port)"])
        #expect(wildStatus == 2)
        #expect(wildOutput.contains("upstream 127.0.0.2:\(port) is the relay's own listen address *:\(port): the relay would dial itself"), "\(wildOutput)")
    }

    @Test("An upstream name that resolves to the listen address: exit 2, the address named")
    func name() throws {
        let port = try freePort()
        let (status, output) = try runToExit(["--listen", "127.0.0.1:\(port)", "--upstream", "localhost:\(port)"])
        #expect(status == 2)
        #expect(output == "sameport: cannot start: upstream localhost:\(port) (127.0.0.1:\(port)) is this relay's own listen address 127.0.0.1:\(port): the relay would dial itself; give the upstream's own address, or listen on another port\n")
    }

    @Test("check names the line of an upstream equal to listen")
    func check() throws {
        let port = try freePort()
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("sameport-selfdial-\(getpid()).toml").path
        try "[[relay]]\nname = \"loop\"\nlisten = \"127.0.0.1:\(port)\"\nupstream = \"127.0.0.1:\(port)\"\n"
            .write(toFile: path, atomically: true, encoding: .utf8)
        defer { unlink(path) }
        let (status, output) = try runToExit(["check", "--config", path])
        #expect(status == 2)
        #expect(output.hasPrefix("\(path):4:12: upstream 127.0.0.1:\(port) is the relay's own listen address 127.0.0.1:\(port): the relay would dial itself; "), "\(output)")
    }

    @Test("SIGHUP onto an upstream that is the relay's own address: the reload fails and the old upstream keeps serving")
    func reload() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let port = try freePort()
        let listen = Endpoint(.loopbackV4, port)
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("sameport-selfdial-reload-\(getpid()).toml").path
        let text = { (upstream: String) in "[[relay]]\nname = \"proxy\"\nlisten = \"\(listen)\"\nupstream = \"\(upstream)\"\n" }
        try text(upstream.endpoint.description).write(toFile: path, atomically: true, encoding: .utf8)
        defer { unlink(path) }
        let relay = try RelayProcess(["run", "--config", path])
        defer { relay.stop() }
        try relay.waitUntilListening()
        try text("localhost:\(port)").write(toFile: path, atomically: true, encoding: .utf8)
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reload failed, still running the previous configuration: relay proxy: upstream localhost:\(port) (127.0.0.1:\(port)) is this relay's own listen address \(listen): the relay would dial itself")
        let client = try TestSocket.connect(to: listen)
        defer { client.close() }
        try client.sendAll(Array("ping\n".utf8))
        #expect(try client.receive(exactly: 5, timeout: .seconds(5)).bytes == Array("ping\n".utf8))
        #expect(upstream.peers == [listen])
    }

    /// In a namespace of the test's own, 10.99.0.1 becomes local only after the relay started:
    ///
    ///   client ──▶ relay *:7000 ──✗ 10.99.0.1:7000 (the relay's own listener: not dialled)
    ///
    /// A relay started once the address is local refuses to start.
    @Test("An address that becomes local after start-up: the dial is refused with one log line, the client reset")
    func atConnectTime() throws {
        let namespace = try NetworkNamespace()
        defer { namespace.remove() }
        let relay = try RelayProcess(
            ["--listen", "*:7000", "--upstream", "10.99.0.1:7000", "--connect-timeout", "2s"], prefix: namespace.prefix)
        defer { relay.stop() }
        try relay.waitUntilListening()
        try namespace.run(["ip", "address", "add", "10.99.0.1/32", "dev", "lo"])
        // Dialling itself, the relay would have held the client (and echoed what it sent). The
        // reset may come so soon that connect() itself reports it.
        let end: TestSocket.End
        do {
            let client = try namespace.withThread { try TestSocket.connect(to: Endpoint(.loopbackV4, 7000)) }
            defer { client.close() }
            let (bytes, ending) = try client.receiveToEnd(timeout: .seconds(5))
            #expect(bytes.isEmpty)
            end = ending
        } catch TestError.system(_, let code) where code == ECONNRESET {
            end = .reset
        }
        #expect(end == .reset)
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("end", in: line) == "connect-failed")
        #expect(line.contains("10.99.0.1:7000: this relay's own listening address, not dialled"), "\(line)")
        #expect(relay.lines(containing: "connection ended").count == 1, "\(relay.output)")
        #expect(relay.stop() == 0)

        let (status, output) = try runToExit(["--listen", "*:7000", "--upstream", "10.99.0.1:7000"], prefix: namespace.prefix)
        #expect(status == 2)
        #expect(output == "sameport: cannot start: upstream 10.99.0.1:7000 is this relay's own listener (*:7000 takes every address of this host): the relay would dial itself; give the upstream's own address, or listen on another port\n")
    }
}
