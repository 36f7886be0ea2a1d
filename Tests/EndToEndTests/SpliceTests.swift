import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// The splice(2) path: that it is the one used, its pipes' life, its fallback to read/write.
///
/// Every relay here names its `--splice` setting, so SAMEPORT_TEST_SPLICE=off changes nothing and
/// the suite does not run twice.
@Suite("Splice", .serialized, .disabled(if: RelayProcess.spliceOff, "every test names its --splice setting"))
struct SpliceTests {
    /// An upstream that sends until the relay stops taking bytes (its client reads nothing), for
    /// two seconds, then closes; `offered` is what it got rid of.
    private func fillingUpstream() throws -> (server: TestServer, offered: Locked<Int?>) {
        let offered = Locked<Int?>(nil)
        let server = try TestServer { socket in
            let count = socket.sendUntilBlocked(total: 64 << 20, timeout: .seconds(2))
            offered.withLock { $0 = count }
        }
        return (server, offered)
    }

    /// Connects a client that reads nothing until the upstream is blocked, counts the relay's pipes
    /// then, reads everything, and checks that the pipes are closed once the connection ended.
    ///
    /// - Returns: the pipes the relay held while it had bytes it could not deliver, above its
    ///   baseline (stdout and stderr).
    private func pipesWhileBlocked(_ relay: RelayProcess, listen: Endpoint, offered: Locked<Int?>) throws -> Int {
        let basePipes = relay.openPipes()
        let client = try TestSocket.connect(to: listen)
        defer { client.close() }
        #expect(waitUntil(timeout: .seconds(15)) { offered.withLock { $0 } != nil })
        let held = relay.openPipes() - basePipes
        let (bytes, end) = try client.receiveToEnd(timeout: .seconds(30))
        #expect(end == .eof)
        #expect(bytes.count == offered.withLock { $0 })
        #expect(bytes.allSatisfy { $0 == 0x5a })
        client.close()
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("end", in: line) == "completed")
        #expect(waitUntil(timeout: .seconds(10)) { relay.openPipes() == basePipes },
                "pipes: \(relay.openPipes()) vs baseline \(basePipes)")
        return held
    }

    @Test("--splice on holds a pipe for the direction that carries bulk (none for the idle one); --splice off holds none",
          arguments: ["on", "off"])
    func pipesInUse(mode: String) throws {
        let (upstream, offered) = try fillingUpstream()
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description], ["--splice", mode])
        defer { relay.stop() }
        let held = try pipesWhileBlocked(relay, listen: listen, offered: offered)
        // One pipe is two descriptors: upstream → client splices once past its first 256 KiB;
        // client → upstream never carried a byte, so it never opened one.
        #expect(held == (mode == "on" ? 2 : 0), "pipe descriptors held during the transfer: \(held)")
    }

    @Test("A 4096-byte pipe: 64 MiB each way at once, checksums equal, sockets and pipes closed after")
    func smallPipe() throws {
        try transferBothWays(size: 64 << 20, ["--splice", "on", "--pipe-size", "4096"])
    }

    @Test("Unprivileged, a --pipe-size above pipe-max-size is refused by the kernel: the pipe keeps its size and splices")
    func pipeSizeAboveKernelLimit() throws {
        let maxText = try String(contentsOfFile: "/proc/sys/fs/pipe-max-size", encoding: .utf8)
        let maxSize = try #require(Int(maxText.trimmingCharacters(in: .whitespacesAndNewlines)))
        try #require(maxSize < 16 << 20, "pipe-max-size \(maxSize) leaves nothing to refuse")
        let (upstream, offered) = try fillingUpstream()
        defer { upstream.stop() }
        let binary = try NobodyBinary()
        let listen = Endpoint(.loopbackV4, try freePort())
        let relay = try RelayProcess(
            ["--listen", listen.description, "--upstream", upstream.endpoint.description, "--splice", "on",
             "--pipe-size", "\(16 << 20)", "--log-level", "debug"],
            prefix: NobodyBinary.prefix, executable: binary.path)
        defer { relay.stop() }
        try relay.waitUntilListening()
        let held = try pipesWhileBlocked(relay, listen: listen, offered: offered)
        #expect(held == 2, "pipe descriptors held during the transfer: \(held)")
        #expect(relay.lines(containing: "splice unavailable").isEmpty, "\(relay.output)")
    }

    @Test("No descriptors left for a pipe (pipe2: EMFILE): the connection copies instead, said once per process at debug")
    func pipeUnavailable() throws {
        let (upstream, relay, listen) = try startEchoRelay(["--splice", "on", "--log-level", "debug"])
        defer { relay.stop(); upstream.stop() }
        try echo(listen, pattern(count: 4096, seed: 7))
        try relay.waitForLines(containing: "connection ended")
        // The ended connection's descriptors are closed before its line is logged.
        let basePipes = relay.openPipes()
        // Room for the client, accept's probe for the next one, and the upstream socket; not for
        // a pipe's two descriptors.
        try relay.limitDescriptors(leavingFree: 3)

        for seed in [8, 9] as [UInt64] {
            try echo(listen, pattern(count: 4 << 20, seed: seed))
            #expect(relay.openPipes() == basePipes)
            // Its descriptors are free again once its line is logged.
            try relay.waitForLines(containing: "connection ended", count: Int(seed) - 6)
        }
        let ended = try relay.waitForLines(containing: "connection ended", count: 3)
        #expect(ended.allSatisfy { field("end", in: $0) == "completed" }, "\(ended)")
        let unavailable = relay.lines(containing: "splice unavailable")
        #expect(unavailable.count == 1, "\(unavailable)")
        #expect(unavailable.first?.contains("pipe2: Too many open files") == true, "\(unavailable)")
    }

    /// Sends `payload` through the relay to the echo upstream while reading the echo; checks it.
    private func echo(_ listen: Endpoint, _ payload: [UInt8]) throws {
        let client = try TestSocket.connect(to: listen)
        defer { client.close() }
        let sender = Background { try? client.sendAll(payload, timeout: .seconds(30)); client.shutdownWrite() }
        let (bytes, end) = try client.receiveToEnd(timeout: .seconds(30))
        #expect(sender.join(timeout: .seconds(30)))
        #expect(end == .eof)
        #expect(bytes.count == payload.count && bytes == payload, "echo of \(payload.count) bytes: \(bytes.count) came back")
    }
}
