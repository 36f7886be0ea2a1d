import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// Counts the relay's "reloaded" lines as they come, reading only what was written since the last
/// look: thousands of reloads would make `RelayProcess.lines(containing:)` quadratic.
private struct ReloadCounter {
    let relay: RelayProcess
    private(set) var count = 0
    private var scanned = 0

    init(_ relay: RelayProcess) {
        self.relay = relay
    }

    /// Waits (polling every 0.2 ms, up to `timeout`) until `total` reloads have been logged.
    mutating func waitFor(_ total: Int, timeout: Duration = .seconds(10)) throws {
        let deadline = ContinuousClock.now + timeout
        while count < total {
            let output = Array(relay.output.utf8.dropFirst(scanned))
            // Only whole lines: the one being written is read again next time.
            guard let end = output.lastIndex(of: UInt8(ascii: "\n")) else {
                guard ContinuousClock.now < deadline else { throw timeoutError(total) }
                usleep(200)
                continue
            }
            for bytes in output[...end].split(separator: UInt8(ascii: "\n")) {
                let line = String(decoding: bytes, as: UTF8.self)
                if line.contains(" reloaded ") { count += 1 }
                if line.contains("reload failed") { throw TestError.failed("a reload failed: \(line)") }
            }
            scanned += end + 1
            if count < total {
                guard ContinuousClock.now < deadline else { throw timeoutError(total) }
                usleep(200)
            }
        }
    }

    private func timeoutError(_ total: Int) -> TestError {
        .timeout("\(total) reloads (logged \(count)); output ends:\n\(relay.output.suffix(2000))")
    }
}

@Suite("Reload memory", .serialized)
struct ReloadMemoryTests {
    /// 2,000 reloads after 400 to warm up; every other one finds the file changed (relay `b` added
    /// or removed, relay `a`'s connect timeout changed), the others find it as it was. Before the
    /// fix each reload kept about 2.3 KB (TOMLKit's parsed tree and accessor buffers, and the
    /// reload deadline's work item until the reload timeout passed): about 4.5 MiB here.
    ///
    ///     client ──> a: 127.0.0.1:A ──> echo upstream
    ///                b: 127.0.0.1:B (every other file) ──> echo upstream
    @Test("2,000 SIGHUP reloads, of a changed and of an unchanged file, leave the relay's memory (VmRSS) where it was")
    func reloadsDoNotLeak() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let listenA = Endpoint(.loopbackV4, try freePort())
        let listenB = Endpoint(.loopbackV4, try freePort())
        let one = "[[relay]]\nname = \"a\"\nlisten = \"\(listenA)\"\nupstream = \"\(upstream.endpoint)\"\n"
        let two = one + "connect_timeout = \"4s\"\n\n[[relay]]\nname = \"b\"\nlisten = \"\(listenB)\"\nupstream = [\"\(upstream.endpoint)\"]\n"
        let directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("sameport-reload-memory-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("sameport.toml").path
        try one.write(toFile: path, atomically: true, encoding: .utf8)

        let relay = try RelayProcess(["run", "--config", path])
        defer { relay.stop() }
        try relay.waitUntilListening()
        var counter = ReloadCounter(relay)
        var isTwo = false
        /// Reload number `number` (from 1): even ones switch the file, odd ones leave it.
        func reload(_ number: Int) throws {
            if number % 2 == 0 {
                isTwo.toggle()
                try (isTwo ? two : one).write(toFile: path, atomically: true, encoding: .utf8)
            }
            kill(relay.pid, SIGHUP)
            try counter.waitFor(number)
        }

        let warmUp = 400, measured = 2_000
        for number in 1...warmUp { try reload(number) }
        let before = relay.residentKiB()
        for number in (warmUp + 1)...(warmUp + measured) { try reload(number) }
        let after = relay.residentKiB()

        // The relay still serves, with the file it was given last: 1,200 switches end on `one`,
        // so relay b is gone.
        #expect(!isTwo)
        try echo(listenA)
        #expect(throws: TestError.self, "relay b still listens on \(listenB)") { try TestSocket.connect(to: listenB).close() }
        let growthKiB = after - before
        print("reload memory: \(measured) reloads, relay RSS \(before) -> \(after) KiB (\(growthKiB * 1024 / measured) bytes a reload)")
        #expect(before > 0 && after > 0)
        #expect(growthKiB < 1024, "RSS grew \(growthKiB) KiB over \(measured) reloads (before \(before), after \(after))")
        #expect(relay.stop() == 0)
    }
}

/// Sends a line through `listen` and expects it back.
private func echo(_ listen: Endpoint) throws {
    let client = try TestSocket.connect(to: listen)
    defer { client.close() }
    try client.sendAll(Array("ping\n".utf8))
    let reply = try client.receive(exactly: 5, timeout: .seconds(5))
    #expect(reply.bytes == Array("ping\n".utf8))
}
