import Glibc
import SamePortCore
import SamePortTestSupport
import Testing
@testable import SamePortNet

/// The splice path's pipe: its sizing and the bytes it moves between two sockets.
@Suite("SplicePipe")
struct SplicePipeTests {
    @Test("The size asked is rounded up to a power-of-two number of pages", arguments: [
        (4096, 4096), (5000, 8192), (100_000, 131_072), (262_144, 262_144),
    ])
    func size(asked: Int, granted: Int) throws {
        let pipe = try SplicePipe(size: asked)
        defer { pipe.close() }
        #expect(pipe.capacity == granted)
        #expect(fcntl(pipe.readEnd, F_GETFL) & O_NONBLOCK != 0)
        #expect(fcntl(pipe.writeEnd, F_GETFD) & FD_CLOEXEC != 0)
    }

    @Test("A pipe the kernel shrank below 64 KiB is not worth splicing; a small size asked for is", arguments: [
        (4096, 262_144, false), (8192, 262_144, false), (65536, 262_144, true), (262_144, 262_144, true),
        (4096, 4096, true), (8192, 16384, false), (65536, 1 << 20, true),
    ])
    func worthSplicing(granted: Int, asked: Int, worth: Bool) throws {
        let pipe = try SplicePipe(size: granted)
        defer { pipe.close() }
        try #require(pipe.capacity == granted)
        #expect(pipe.isWorthSplicing(asked: asked) == worth)
    }

    @Test("Socket to pipe to socket: every byte in order; EAGAIN as a value; EOF as 0")
    func splicesBetweenSockets() throws {
        // in: a connected pair whose accepted end the pipe reads; out: another pair it writes to.
        let (inWriter, inReader) = try connectedPair()
        let (outWriter, outReader) = try connectedPair()
        defer { [inWriter, inReader, outWriter, outReader].forEach { $0.close() } }
        let pipe = try SplicePipe(size: 65536)
        defer { pipe.close() }
        let from = Socket(fd: inReader.fd), to = Socket(fd: outWriter.fd)

        guard case .wouldBlock = try pipe.fill(from: from, count: pipe.capacity) else {
            Issue.record("an empty socket should be EAGAIN")
            return
        }
        let payload = (0..<40_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try inWriter.sendAll(payload)
        inWriter.shutdownWrite()
        var inPipe = 0
        #expect(waitUntil(timeout: .seconds(5)) {
            if case .processed(let count)? = try? pipe.fill(from: from, count: pipe.capacity - inPipe) { inPipe += count }
            return inPipe == payload.count
        })
        guard case .processed(0) = try pipe.fill(from: from, count: pipe.capacity - inPipe) else {
            Issue.record("EOF should splice 0 bytes")
            return
        }
        guard case .processed(let moved) = try pipe.drain(to: to, count: inPipe) else {
            Issue.record("the drain should move bytes")
            return
        }
        #expect(moved == payload.count)
        #expect(try outReader.receive(exactly: payload.count, timeout: .seconds(5)).bytes == payload)
    }

    /// A connected TCP pair on loopback: (client, accepted), both non-blocking.
    private func connectedPair() throws -> (TestSocket, TestSocket) {
        let listener = try TestSocket.tcp(ipv6: false)
        defer { listener.close() }
        try listener.bind(Endpoint(.loopbackV4, 0))
        guard Glibc.listen(listener.fd, 1) == 0, let endpoint = listener.localEndpoint else {
            throw TestError.system("listen", errno)
        }
        let client = try TestSocket.connect(to: endpoint)
        let fd = Glibc.accept(listener.fd, nil, nil)
        guard fd >= 0 else { throw TestError.system("accept", errno) }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        return (client, TestSocket(fd: fd))
    }
}
