import Glibc
import SamePortCore
import SamePortTestSupport
import Synchronization
import Testing

/// Bytes through the pump: volume, half-close, back-pressure.
@Suite("Transfer", .serialized)
struct TransferTests {
    @Test("64 MiB each way at the same time through one connection, checksums equal")
    func bothWaysAtOnce() throws {
        try transferBothWays(size: 64 << 20)
    }

    @Test("Half-close client to upstream: request, SHUT_WR, a reply sent 2 s after EOF arrives whole")
    func halfCloseFromClient() throws {
        let reply = pattern(count: 1 << 20, seed: 3)
        let request = Array("request: the client has finished sending\n".utf8)
        let upstreamGot = Mutex<[UInt8]?>(nil)
        let (upstream, relay, listen) = try startServedRelay { socket in
            guard let (bytes, end) = try? socket.receiveToEnd(), end == .eof else { return }
            upstreamGot.withLock { $0 = bytes }
            usleep(2_000_000)  // the scenario itself: reply long after the client's EOF
            try? socket.sendAll(reply)
        }
        defer { relay.stop(); upstream.stop() }
        let client = try TestSocket.connect(to: listen)
        try client.sendAll(request)
        client.shutdownWrite()
        let (bytes, end) = try client.receiveToEnd(timeout: .seconds(15))
        #expect(end == .eof)
        #expect(bytes == reply)
        #expect(upstreamGot.withLock { $0 } == request)
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("end", in: line) == "completed")
    }

    @Test("Bytes and a half-close the client sends while the relay is still dialling arrive whole")
    func halfCloseWhileDialling() throws {
        // An upstream whose accept queue is full drops the relay's SYN, and the kernel sends it
        // again a second later: the client's bytes and FIN arrive meanwhile, while the relay
        // dials. The relay must read past its first short read to the EOF (no new edge comes).
        let listener = try TestSocket.tcp(ipv6: false)
        defer { listener.close() }
        try listener.bind(Endpoint(.loopbackV4, 0))
        #expect(Glibc.listen(listener.fd, 0) == 0)
        let upstreamEndpoint = try #require(listener.localEndpoint)
        let filler = try TestSocket.connect(to: upstreamEndpoint)  // the queue's one place
        defer { filler.close() }
        let (relay, listen) = try startRelay(upstreams: [upstreamEndpoint.description])
        defer { relay.stop() }
        let client = try TestSocket.connect(to: listen)
        let request = Array("sent before the upstream answered\n".utf8)
        try client.sendAll(request)
        client.shutdownWrite()
        usleep(300_000)
        let first = try #require(try Self.accept(listener, timeout: .seconds(5)))  // the filler: room for the relay
        first.close()
        let upstream = try #require(try Self.accept(listener, timeout: .seconds(10)), "the relay's connection never came")
        defer { upstream.close() }
        let (bytes, end) = try upstream.receiveToEnd(timeout: .seconds(10))
        #expect(bytes == request)
        #expect(end == .eof)
        let reply = Array("answered after the client's EOF\n".utf8)
        try upstream.sendAll(reply)
        upstream.close()
        let answer = try client.receiveToEnd(timeout: .seconds(10))
        #expect(answer.bytes == reply)
        #expect(answer.end == .eof)
    }

    /// Accepts one connection from a raw listening socket within `timeout`.
    private static func accept(_ listener: TestSocket, timeout: Duration) throws -> TestSocket? {
        guard try listener.poll(Int16(POLLIN), timeout: timeout) else { return nil }
        let fd = Glibc.accept(listener.fd, nil, nil)
        guard fd >= 0 else { return nil }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        return TestSocket(fd: fd)
    }

    @Test("A response and its FIN that reach the relay together reach the client in one segment, each way")
    func lastBytesRideWithFIN() throws {
        let response = Array("220 ready, and closing\r\n".utf8)
        let request = Array("QUIT\r\n".utf8)
        let upstreamGot = Mutex<(bytes: [UInt8], segments: UInt32?)?>(nil)
        let (upstream, relay, listen) = try startServedRelay { socket in
            try? socket.sendWithFIN(response)
            guard let (bytes, end) = try? socket.receiveToEnd(), end == .eof else { return }
            upstreamGot.withLock { $0 = (bytes, socket.segmentsReceived) }
        }
        defer { relay.stop(); upstream.stop() }
        let client = try TestSocket.connect(to: listen)
        let (bytes, end) = try client.receiveToEnd(timeout: .seconds(15))
        #expect(end == .eof)
        #expect(bytes == response)
        // The relay's SYN-ACK, then the response with the FIN (not the response, then the FIN).
        #expect(client.segmentsReceived == 2)
        try client.sendWithFIN(request)
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("end", in: line) == "completed")
        let got = try #require(waitUntil(timeout: .seconds(5)) { upstreamGot.withLock { $0 != nil } } ? upstreamGot.withLock { $0 } : nil)
        #expect(got.bytes == request)
        // The handshake's ACK, the relay's ACK of the response and FIN, then QUIT with the FIN.
        #expect(got.segments == 3)
    }

    @Test("Half-close upstream to client: data, SHUT_WR, a reply sent 2 s after EOF arrives whole")
    func halfCloseFromUpstream() throws {
        let banner = pattern(count: 1 << 20, seed: 4)
        let reply = pattern(count: 1 << 20, seed: 5)
        let upstreamGot = Mutex<([UInt8], TestSocket.End)?>(nil)
        let (upstream, relay, listen) = try startServedRelay { socket in
            try? socket.sendAll(banner)
            socket.shutdownWrite()
            if let result = try? socket.receiveToEnd(timeout: .seconds(15)) {
                upstreamGot.withLock { $0 = (result.bytes, result.end) }
            }
        }
        defer { relay.stop(); upstream.stop() }
        let client = try TestSocket.connect(to: listen)
        let (bytes, end) = try client.receiveToEnd(timeout: .seconds(15))
        #expect(end == .eof)
        #expect(bytes == banner)
        usleep(2_000_000)  // the scenario itself: reply long after the upstream's EOF
        try client.sendAll(reply)
        client.shutdownWrite()
        #expect(try client.waitForEnd(timeout: .seconds(15)) == .eof)
        #expect(waitUntil(timeout: .seconds(10)) { upstreamGot.withLock { $0 } != nil })
        let got = try #require(upstreamGot.withLock { $0 })
        #expect(got.1 == .eof)
        #expect(got.0 == reply)
    }

    @Test("A connection idle past the watchdog gives its buffers back and relays whole again after")
    func idleThenBusy() throws {
        // Copy path for this one: the buffers given back when idle are the copy path's.
        let (upstream, relay, listen) = try startEchoRelay(["--splice", "off"])
        defer { relay.stop(); upstream.stop() }
        let client = try TestSocket.connect(to: listen)
        defer { client.close() }
        for round in 0..<3 {
            let payload = pattern(count: 1 << 20, seed: UInt64(round + 1))
            let sender = Background { try? client.sendAll(payload) }
            let echoed = try client.receive(exactly: payload.count, timeout: .seconds(20))
            #expect(sender.join(timeout: .seconds(20)))
            #expect(echoed.bytes == payload, "round \(round)")
            // Idle for two watchdog intervals (250 ms, then 500 ms): the buffers are released.
            usleep(900_000)
        }
    }

    @Test("Back-pressure: a client that stops reading does not grow the relay's memory")
    func backPressure() throws {
        let bufferSize = 64 * 1024
        let attempted = 200 << 20
        let sent = Mutex<Int?>(nil)
        let upstream = try TestServer { socket in
            // Offer 200 MiB; the relay must stop reading once the client's side is full.
            let count = socket.sendUntilBlocked(total: attempted, timeout: .seconds(4))
            sent.withLock { $0 = count }
        }
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description], ["--buffer-size", "\(bufferSize)"])
        defer { relay.stop() }
        // Warm up: one connection through, so threads and the allocator are in their steady state.
        let warm = try TestSocket.connect(to: listen)
        _ = try warm.receive(exactly: 1 << 20, timeout: .seconds(10))
        warm.close()
        try relay.waitForLines(containing: "connection ended")
        #expect(waitUntil(timeout: .seconds(10)) { sent.withLock { $0 } != nil })
        sent.withLock { $0 = nil }
        let before = relay.residentKiB()

        let client = try TestSocket.connect(to: listen)
        #expect(waitUntil(timeout: .seconds(15)) { sent.withLock { $0 } != nil })
        let after = relay.residentKiB()
        let offered = try #require(sent.withLock { $0 })
        // The kernel's socket buffers hold a few MiB; the rest stayed with the sender.
        #expect(offered < 64 << 20, "the upstream could send \(offered) bytes to a client that reads nothing")
        let growthKiB = after - before
        let boundKiB = 2 * bufferSize / 1024 + 1024  // two buffers plus a small constant
        #expect(growthKiB < boundKiB, "RSS grew \(growthKiB) KiB (before \(before), after \(after))")
        print("back-pressure: offered \(attempted >> 20) MiB, accepted \(offered) bytes, relay RSS \(before) -> \(after) KiB")

        // Every byte the upstream got rid of still reaches the client, in order.
        let (bytes, end) = try client.receiveToEnd(timeout: .seconds(30))
        #expect(end == .eof)
        #expect(bytes.count == offered)
        #expect(bytes.allSatisfy { $0 == 0x5a })
    }

    @Test("Stopping mid-transfer resets the client: a cut stream never looks complete")
    func stopMidTransferResets() throws {
        let upstream = try TestServer { socket in
            _ = socket.sendUntilBlocked(total: 64 << 20, timeout: .seconds(5))
        }
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description])
        let client = try TestSocket.connect(to: listen)
        // The client reads nothing, so the relay holds bytes it has not delivered.
        #expect(waitUntil(timeout: .seconds(10)) { upstream.activeConnections == 1 })
        usleep(300_000)  // let the relay fill its buffer: the scenario, not a synchronisation
        #expect(relay.stop() == 0)
        #expect(try client.waitForEnd(timeout: .seconds(10)) == .reset)
        #expect(field("end", in: relay.lines(containing: "connection ended").first ?? "") == "shutdown")
    }

    @Test("Stopping while the client sends resets the upstream: its stream was cut, not ended")
    func stopWhileClientSends() throws {
        let seen = Locked<TestSocket.End?>(nil)
        let upstream = try TestServer { socket in
            let end = try? socket.waitForEnd(timeout: .seconds(20))
            seen.withLock { $0 = end }
        }
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description])
        let client = try TestSocket.connect(to: listen)
        let sender = Background { _ = client.sendUntilBlocked(total: 1 << 34, timeout: .seconds(3)) }
        usleep(500_000)  // the scenario: a transfer under way
        #expect(relay.stop() == 0)
        #expect(waitUntil(timeout: .seconds(10)) { seen.withLock { $0 } != nil })
        #expect(seen.withLock { $0 } == .reset)
        #expect(sender.join(timeout: .seconds(10)))
    }

    @Test("A slow reader being fed is not idle: the idle timeout counts writes too")
    func slowReaderIsNotIdle() throws {
        let payload = pattern(count: 8 << 20, seed: 6)
        let (upstream, relay, connected) = try smallReceiver(idleTimeout: "1s") { socket in
            try? socket.sendAll(payload, timeout: .seconds(60))
        }
        defer { relay.stop(); upstream.stop() }
        // 80 KB/s for 3 s: bytes keep reaching the client, but the relay's 128 KiB buffer takes
        // 1.6 s to drain (it reads nothing from the upstream meanwhile), and the kernel reports the
        // socket writable only once much of its send queue is free.
        var received: [UInt8] = []
        let slowUntil = ContinuousClock.now + .seconds(3)
        while ContinuousClock.now < slowUntil {
            let chunk = try connected.receive(exactly: 8192, timeout: .seconds(5))
            received += chunk.bytes
            #expect(chunk.end == nil, "the stream ended while the client was still reading")
            if chunk.end != nil { return }
            usleep(100_000)
        }
        #expect(relay.lines(containing: "connection ended").isEmpty)
        let (rest, end) = try connected.receiveToEnd(timeout: .seconds(30))
        received += rest
        #expect(end == .eof)
        #expect(received == payload)
    }

    @Test("Bytes the kernel is still delivering to a slow reader count as activity")
    func kernelDeliveryIsNotIdle() throws {
        // 2 MiB fits in the kernel's socket buffers at once: the relay has nothing left to read
        // or write while the client drains them, slowly, for longer than the idle timeout. The
        // upstream stays open, so only the send queue shrinking shows the connection is alive.
        let payload = pattern(count: 2 << 20, seed: 7)
        let (upstream, relay, connected) = try smallReceiver(idleTimeout: "500ms") { socket in
            try? socket.sendAll(payload, timeout: .seconds(30))
            _ = try? socket.waitForEnd(timeout: .seconds(30))
        }
        defer { relay.stop(); upstream.stop() }
        var received: [UInt8] = []
        while received.count < payload.count {
            let chunk = try connected.receive(exactly: min(64 * 1024, payload.count - received.count), timeout: .seconds(5))
            received += chunk.bytes
            #expect(chunk.end == nil, "cut after \(received.count) of \(payload.count) bytes")
            if chunk.end != nil { return }
            usleep(50_000)
        }
        #expect(received == payload)
    }

    @Test("A reader that stops reading is cut one idle timeout after the last byte moved, not two")
    func stoppedReaderIsCutOnTime() throws {
        // The upstream fills every buffer on the way to a client that never reads (its window
        // closes): nothing moves after the first few milliseconds.
        let (upstream, relay, connected) = try smallReceiver(idleTimeout: "1s") { socket in
            _ = socket.sendUntilBlocked(total: 64 << 20, timeout: .seconds(5))
            _ = try? socket.waitForEnd(timeout: .seconds(10))
        }
        defer { relay.stop(); upstream.stop() }
        defer { connected.close() }
        let line = try relay.waitForLines(containing: "end=idle-timeout", timeout: .seconds(10))[0]
        // The first look at the send queue is the baseline, not progress.
        let seconds = field("duration", in: line).flatMap { Double($0.dropLast()) } ?? .infinity
        #expect(seconds >= 1.0 && seconds < 1.6, "\(line)")
    }

    /// An upstream running `handler`, a relay to it with `--idle-timeout`, and a client connected
    /// through it with a 16 KiB receive buffer (a receiver that fills quickly); the caller stops
    /// the relay and the upstream.
    private func smallReceiver(
        idleTimeout: String, _ handler: @escaping @Sendable (TestSocket) -> Void
    ) throws -> (upstream: TestServer, relay: RelayProcess, connected: TestSocket) {
        let upstream = try TestServer(handler: handler)
        let relay: RelayProcess, listen: Endpoint
        do {
            (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description], ["--idle-timeout", idleTimeout])
        } catch {
            upstream.stop()
            throw error
        }
        do {
            let client = try TestSocket.tcp(ipv6: false)
            client.setOption(SOL_SOCKET, SO_RCVBUF, 16 * 1024)
            return (upstream, relay, try TestSocket.connect(to: listen, using: client))
        } catch {
            relay.stop()
            upstream.stop()
            throw error
        }
    }
}
