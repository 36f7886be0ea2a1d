import Foundation
import Synchronization
import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// Starts `sameport` listening on a free port of `host` with the given arguments, waits for its
/// "listening on" line, and returns it with the listen endpoint. A port taken by someone else
/// between choosing and binding is retried with another.
func startRelay(
    host: IPAddress = .loopbackV4, listenText: ((UInt16) -> String)? = nil,
    upstreams: [String], _ extra: [String] = []
) throws -> (relay: RelayProcess, listen: Endpoint) {
    _ = ignoreSIGPIPE
    var lastOutput = ""
    for _ in 0..<5 {
        let port = try freePort(host)
        let listen = listenText?(port) ?? Endpoint(host, port).description
        let relay = try RelayProcess(["--listen", listen] + upstreams.flatMap { ["--upstream", $0] } + extra)
        do {
            try relay.waitUntilListening()
            return (relay, Endpoint(host, port))
        } catch {
            lastOutput = relay.output
            relay.stop()
            if !lastOutput.contains("already in use") { throw error }
        }
    }
    throw TestError.failed("could not start the relay: \(lastOutput)")
}

/// An echo upstream on 127.0.0.1 and a relay to it, with `extra` flags; the caller stops both.
func startEchoRelay(_ extra: [String] = []) throws -> (upstream: TestServer, relay: RelayProcess, listen: Endpoint) {
    try startServedRelay(extra, upstream: TestServer.echo)
}

/// An upstream on 127.0.0.1 that serves each connection with `upstream`, and a relay to it, with
/// `extra` flags; the caller stops both.
func startServedRelay(
    _ extra: [String] = [], upstream handler: @escaping @Sendable (TestSocket) -> Void
) throws -> (upstream: TestServer, relay: RelayProcess, listen: Endpoint) {
    let upstream = try TestServer(handler: handler)
    do {
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description], extra)
        return (upstream, relay, listen)
    } catch {
        upstream.stop()
        throw error
    }
}

/// A copy of the sameport binary that `nobody` may execute (the build directory may not be), and
/// the `setpriv` prefix that runs it as nobody without capabilities. Removed when dropped.
final class NobodyBinary {
    let path: String
    private let directory: URL
    static let prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("sameport-nobody-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        path = directory.appendingPathComponent("sameport").path
        try FileManager.default.copyItem(atPath: RelayProcess.binary, toPath: path)
        chmod(directory.path, 0o755)
        chmod(path, 0o755)
    }

    deinit {
        try? FileManager.default.removeItem(at: directory)
    }
}

/// `size` bytes each way at the same time through one connection of a relay started with `extra`:
/// checks both checksums, the logged byte counts, a completed end, and that the relay's sockets
/// and pipes return to their count from before the connection.
func transferBothWays(size: Int, _ extra: [String] = []) throws {
    let toUpstream = pattern(count: size, seed: 1)
    let toClient = pattern(count: size, seed: 2)
    let upstreamReceived = Mutex<Checksum?>(nil)
    let upstream = try TestServer { socket in
        let sender = Background { try? socket.sendAll(toClient, timeout: .seconds(120)); socket.shutdownWrite() }
        var sum = Checksum()
        _ = try? socket.receiveAll(timeout: .seconds(120)) { sum.add($0) }
        _ = sender.join(timeout: .seconds(120))
        upstreamReceived.withLock { $0 = sum }
    }
    defer { upstream.stop() }
    let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description], extra)
    defer { relay.stop() }
    let descriptorsBefore = relay.openFileDescriptors(linkingTo: ["socket:", "pipe:"])

    let client = try TestSocket.connect(to: listen)
    let sender = Background { try? client.sendAll(toUpstream, timeout: .seconds(120)); client.shutdownWrite() }
    var clientReceived = Checksum()
    let end = try client.receiveAll(timeout: .seconds(120)) { clientReceived.add($0) }
    #expect(sender.join(timeout: .seconds(120)))
    #expect(end == .eof)

    var expectedToClient = Checksum(), expectedToUpstream = Checksum()
    toClient.withUnsafeBytes { expectedToClient.add($0) }
    toUpstream.withUnsafeBytes { expectedToUpstream.add($0) }
    #expect(clientReceived == expectedToClient)
    #expect(waitUntil(timeout: .seconds(30)) { upstreamReceived.withLock { $0 } != nil })
    #expect(upstreamReceived.withLock { $0 } == expectedToUpstream)
    let line = try relay.waitForLines(containing: "connection ended")[0]
    #expect(field("bytes_to_upstream", in: line) == "\(size)")
    #expect(field("bytes_to_client", in: line) == "\(size)")
    #expect(field("end", in: line) == "completed")
    client.close()
    #expect(waitUntil(timeout: .seconds(10)) { relay.openFileDescriptors(linkingTo: ["socket:", "pipe:"]) == descriptorsBefore },
            "sockets and pipes: \(relay.openFileDescriptors(linkingTo: ["socket:", "pipe:"])) vs \(descriptorsBefore) before")
}

/// Connects a client the relay should turn away (reset) and waits for its end: a reset that comes
/// while connect() is still completing counts as the reset it is.
func endOfTurnedAway(_ target: Endpoint, from source: Endpoint? = nil, timeout: Duration = .seconds(5)) throws -> TestSocket.End {
    let client: TestSocket
    do {
        client = try TestSocket.connect(to: target, from: source)
    } catch TestError.system(_, ECONNRESET) {
        return .reset
    }
    defer { client.close() }
    return try client.waitForEnd(timeout: timeout)
}

/// The `key=value` field of a log line.
func field(_ key: String, in line: String) -> String? {
    line.split(separator: " ").first { $0.hasPrefix("\(key)=") }.map { String($0.dropFirst(key.count + 1)) }
}

/// Deterministic pseudo-random bytes (xorshift), so that a transfer can be checked end to end.
func pattern(count: Int, seed: UInt64) -> [UInt8] {
    var state = seed | 1
    var bytes = [UInt8](repeating: 0, count: count)
    bytes.withUnsafeMutableBytes { raw in
        let words = raw.bindMemory(to: UInt64.self)
        for index in words.indices {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            words[index] = state
        }
    }
    return bytes
}

/// FNV-1a over 64-bit words: a fast checksum for large transfers.
struct Checksum: Equatable, CustomStringConvertible {
    private(set) var value: UInt64 = 0xcbf2_9ce4_8422_2325
    private(set) var count = 0
    private var pending: [UInt8] = []

    mutating func add(_ chunk: UnsafeRawBufferPointer) {
        var offset = 0
        while !pending.isEmpty, offset < chunk.count {
            pending.append(chunk[offset])
            offset += 1
            if pending.count == 8 {
                mix(pending.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
                pending = []
            }
        }
        while offset + 8 <= chunk.count {
            mix(chunk.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
            offset += 8
        }
        pending.append(contentsOf: chunk[offset...])
        count += chunk.count
    }

    private mutating func mix(_ word: UInt64) {
        value = (value ^ word) &* 0x100_0000_01b3
    }

    var description: String { "\(count) bytes, fnv \(String(value, radix: 16))" }
}

/// Runs `body` on a new thread; `join` waits for it with a deadline.
final class Background: Sendable {
    private let done = Atomic<Bool>(false)

    init(_ body: @escaping @Sendable () -> Void) {
        Thread { [self] in
            body()
            done.store(true, ordering: .sequentiallyConsistent)
        }.start()
    }

    /// True if the body finished within `timeout`.
    func join(timeout: Duration) -> Bool {
        waitUntil(timeout: timeout) { done.load(ordering: .sequentiallyConsistent) }
    }
}
