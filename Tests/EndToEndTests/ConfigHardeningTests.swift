import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// A directory of its own for files the test writes as bytes (NUL, invalid UTF-8) or makes as
/// FIFOs; removed by `remove()`.
private struct Scratch {
    let directory: String

    init() throws {
        var template = Array("/tmp/sameport-hardening-XXXXXX".utf8CString)
        guard let created = mkdtemp(&template) else { throw TestError.failed("mkdtemp: \(errno)") }
        directory = String(cString: created)
    }

    /// Writes `bytes` to `name` (replacing it atomically) and returns its path.
    @discardableResult
    func write(_ name: String, _ bytes: [UInt8]) throws -> String {
        let path = directory + "/" + name
        try Data(bytes).write(to: URL(fileURLWithPath: path), options: .atomic)
        return path
    }

    @discardableResult
    func write(_ name: String, _ text: String) throws -> String {
        try write(name, Array(text.utf8))
    }

    func fifo(_ name: String) throws -> String {
        let path = directory + "/" + name
        unlink(path)
        guard mkfifo(path, 0o644) == 0 else { throw TestError.failed("mkfifo \(path): \(errno)") }
        return path
    }

    func remove() {
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// Runs sameport to completion within `timeout`: its exit status (nil when it had to be killed,
/// or died of a signal) and its output.
private func runToExit(_ arguments: [String], timeout: Duration = .seconds(10)) throws -> (status: Int32?, output: String) {
    let process = try RelayProcess(arguments)
    let status = process.waitForExit(timeout: timeout)
    if status == nil { process.stop(signal: SIGKILL) }
    return (status, process.output)
}

private func relayText(listen: Endpoint, upstream: Endpoint, extra: String = "") -> String {
    "[[relay]]\nname = \"proxy\"\nlisten = \"\(listen)\"\nupstream = \"\(upstream)\"\n\(extra)"
}

/// Sends a line through `listen` and expects it back.
private func echo(_ listen: Endpoint, from source: Endpoint? = nil) throws {
    let client = try TestSocket.connect(to: listen, from: source)
    defer { client.close() }
    try client.sendAll(Array("ping\n".utf8))
    #expect(try client.receive(exactly: 5, timeout: .seconds(5)).bytes == Array("ping\n".utf8))
}

@Suite("Configuration file: hostile and unlucky files", .serialized)
struct ConfigHardeningTests {
    @Test("A FIFO, a directory and a device are refused at once by check and run (a FIFO hung start-up for ever)")
    func notRegularFiles() throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let fifo = try scratch.fifo("fifo.toml")
        for (path, what) in [(fifo, "a FIFO (named pipe), which would block the read until a writer comes"),
                             (scratch.directory, "a directory"), ("/dev/null", "a character device")] {
            for command in ["check", "run"] {
                let (status, output) = try runToExit([command, "--config", path])
                #expect(status == 2, "\(command) \(path): \(output)")
                #expect(output == "sameport: configuration error: \(path) is \(what), not a regular file: give the path of the configuration file itself\n")
            }
        }
    }

    @Test("A NUL in a comment: check refuses the file at FILE:LINE:COLUMN (it said OK, and the relay served a denied client)")
    func nulByte() throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let path = try scratch.write("nul.toml", Array(relayText(listen: Endpoint(.loopbackV4, 7000), upstream: Endpoint(.loopbackV4, 9000)).utf8)
            + Array("# managed by tool ".utf8) + [0] + Array("\ndeny = [\"127.0.0.3\"]\n".utf8))
        let (status, output) = try runToExit(["check", "--config", path])
        #expect(status == 2)
        #expect(output == """
            \(path):5:19: a NUL byte (U+0000): TOML forbids control characters, and the parser would ignore everything after it; remove it
            sameport: configuration error: 1 problem in \(path); fix it and run 'sameport check --config \(path)'

            """)
        let latin1 = try scratch.write("latin1.toml", Array("[[relay]]\nname = \"caf".utf8) + [0xE9] + Array("\"\n".utf8))
        let (latinStatus, latinOutput) = try runToExit(["check", "--config", latin1])
        #expect(latinStatus == 2)
        #expect(latinOutput.hasPrefix("\(latin1):2:12: the file is not valid UTF-8 here (byte 22, 0xE9): "), "\(latinOutput)")
    }

    @Test("Nesting 90,000 deep and a 10 MB name: check answers with the limit, exit 2 (the first killed it with SIGSEGV)")
    func limits() throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let deep = try scratch.write("deep.toml", "[[relay]]\nlisten = \"127.0.0.1:7000\"\nupstream = " + String(repeating: "[", count: 90_000) + "\n")
        let (status, output) = try runToExit(["check", "--config", deep])
        #expect(status == 2)
        #expect(output.hasPrefix("\(deep):3:28: brackets and braces nested more than 16 deep: "), "\(output.prefix(500))")
        let big = try scratch.write("big.toml", "[[relay]]\nname = \"" + String(repeating: "n", count: 10 << 20) + "\"\n")
        let (bigStatus, bigOutput) = try runToExit(["check", "--config", big])
        #expect(bigStatus == 2)
        #expect(bigOutput.hasPrefix("\(big):1:1: the file is larger than 4 MiB, the most a configuration file may be "), "\(bigOutput.prefix(500))")
        #expect(bigOutput.count < 1_000)
    }

    @Test("check reads 5,000 relays in well under the 96 s it took in a debug build")
    func manyRelays() throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        var text = "[defaults]\nupstream = \"127.0.0.1:9000\"\n"
        for index in 0..<5_000 {
            text += "\n[[relay]]\nname = \"r\(index)\"\nlisten = \"127.0.\(index / 250).\(index % 250 + 1):7000\"\n"
        }
        let path = try scratch.write("many.toml", text)
        let clock = ContinuousClock()
        var result: (status: Int32?, output: String) = (nil, "")
        let elapsed = try clock.measure { result = try runToExit(["check", "--config", path], timeout: .seconds(30)) }
        #expect(result.status == 0)
        #expect(result.output.hasSuffix("\(path): 5000 relays, configuration OK\n"))
        #expect(elapsed < .seconds(10), "check of 5,000 relays took \(elapsed)")
    }

    @Test("SIGHUP onto a file nested too deep, a FIFO, or a NUL: each reload fails at once and the relay serves on, unchanged")
    func badReloads() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let scratch = try Scratch()
        defer { scratch.remove() }
        let listen = Endpoint(.loopbackV4, try freePort())
        let good = relayText(listen: listen, upstream: upstream.endpoint)
        let path = try scratch.write("sameport.toml", good)
        // A long reload timeout: a FIFO must fail at once, not when the timeout ends.
        let relay = try RelayProcess(["run", "--config", path, "--reload-timeout", "60s"])
        defer { relay.stop() }
        try relay.waitUntilListening()
        try echo(listen)

        try scratch.write("sameport.toml", good.replacingOccurrences(of: "upstream = ", with: "upstream = " + String(repeating: "[", count: 90_000)))
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reload failed, still running the previous configuration: \(path):4:28: brackets and braces nested more than 16 deep")
        try echo(listen)

        _ = try scratch.fifo("sameport.toml")
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reload failed, still running the previous configuration: configuration error: \(path) is a FIFO (named pipe)", timeout: .seconds(10))
        try echo(listen)

        unlink(path)
        try scratch.write("sameport.toml", Array((good + "# managed by tool ").utf8) + [0] + Array("\ndeny = [\"127.0.0.3\"]\n".utf8))
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reload failed, still running the previous configuration: \(path):5:19: a NUL byte (U+0000)")
        // Served from 127.0.0.3: the deny line was not half-applied either.
        try echo(listen, from: Endpoint(IPAddress("127.0.0.3") ?? .loopbackV4, 0))
        #expect(relay.lines(containing: "reloaded").isEmpty)
        #expect(relay.stop() == 0)
    }
}
