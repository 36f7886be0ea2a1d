import Dispatch
import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Synchronization
import Testing
@testable import SamePortNet

/// A loopback TCP connection: the test's end, and the relay's (non-blocking, from accept4).
func loopbackPair(_ listener: Listener, receiveBuffer: Int32? = nil) throws -> (peer: TestSocket, relay: Socket) {
    let socket = try TestSocket.tcp(ipv6: false)
    // Set before connect, so that the window it advertises fits the buffer from the start.
    if let receiveBuffer { socket.setOption(SOL_SOCKET, SO_RCVBUF, receiveBuffer) }
    let peer = try TestSocket.connect(to: listener.endpoint, using: socket)
    let deadline = ContinuousClock.now + .seconds(5)
    while ContinuousClock.now < deadline {
        if let (socket, _) = try listener.listeningSocket.accept() { return (peer, socket) }
        usleep(1000)
    }
    throw TestError.timeout("accept")
}

/// Pumps `direction` until it finishes or fails, waiting with poll(2) for what it says it waits
/// for, as the shard's edge-triggered events would; returns the last outcome.
func pumpToEnd(_ direction: inout Direction, from: Socket, to: Socket, timeout: Duration = .seconds(30)) -> Direction.Outcome {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        let outcome = direction.pump(from: from, to: to)
        var poller = pollfd(fd: 0, events: 0, revents: 0)
        switch outcome {
        case .finished, .failed: return outcome
        case .yielded: continue
        case .awaitingRead: poller = pollfd(fd: from.fd, events: Int16(POLLIN) | 0x2000, revents: 0)
        case .awaitingWrite: poller = pollfd(fd: to.fd, events: Int16(POLLOUT), revents: 0)
        }
        _ = poll(&poller, 1, 20)
    }
    return .awaitingRead
}

/// test sender ──▶ [from] relay's Direction [to] ──▶ test receiver, all on loopback; the
/// relay's sockets and the listener are closed with it.
final class Topology {
    let listener: Listener
    let sender: TestSocket
    let from: Socket
    let receiver: TestSocket
    let to: Socket

    init(receiveBuffer: Int32? = nil) throws {
        _ = ignoreSIGPIPE
        listener = try Listener.open(Endpoint(.loopbackV4, 0), dualStack: false)
        (sender, from) = try loopbackPair(listener)
        (receiver, to) = try loopbackPair(listener, receiveBuffer: receiveBuffer)
    }

    deinit {
        from.close()
        to.close()
        listener.close()
    }
}

@Suite("Direction: the pump on loopback sockets", .serialized)
struct DirectionTests {
    /// Copy path (no pipe), and splice from the first byte.
    static let paths: [(name: String, pipeSize: Int?)] = [("copy", nil), ("splice", 65536)]

    /// The upstream's direction on the copy path, with a 4 KiB buffer.
    static func copyingFromUpstream() -> Direction {
        Direction(fromSide: .upstream, capacity: 4096, pipeSize: nil, spliceAfter: 0, now: 0)
    }

    @Test("Bytes arrive in order and EOF becomes a half-close, each way", arguments: [0, 1])
    func halfClose(path: Int) throws {
        let topology = try Topology()
        defer { withExtendedLifetime(topology) {} }  // its deinit closes the sockets
        let (sender, from, receiver, to) = (topology.sender, topology.from, topology.receiver, topology.to)
        var direction = Direction(fromSide: .client, capacity: 4096, pipeSize: Self.paths[path].pipeSize, spliceAfter: 0, now: 0)
        defer { direction.release() }
        let payload = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let writer = Thread {
            try? sender.sendAll(payload)
            sender.shutdownWrite()
        }
        writer.start()
        let outcome = pumpToEnd(&direction, from: from, to: to)
        guard case .finished = outcome else {
            Issue.record("outcome \(outcome)")
            return
        }
        let (bytes, end) = try receiver.receiveToEnd(timeout: .seconds(10))
        #expect(end == .eof)
        #expect(bytes == payload)
        #expect(direction.bytes == UInt64(payload.count))
        // The other way is still open: the receiver's side can still talk back (a half-close).
        try receiver.sendAll(Array("reply".utf8))
        receiver.shutdownWrite()
        var back = Direction(fromSide: .upstream, capacity: 4096, pipeSize: Self.paths[path].pipeSize, spliceAfter: 0, now: 0)
        defer { back.release() }
        guard case .finished = pumpToEnd(&back, from: to, to: from) else {
            Issue.record("the reverse direction did not finish")
            return
        }
        let reply = try sender.receiveToEnd(timeout: .seconds(10))
        #expect(reply.bytes == Array("reply".utf8))
        #expect(reply.end == .eof)
    }

    @Test("Small messages keep copying past the splice threshold; a read that fills the buffer switches to splice")
    func spliceOnlyForBulk() throws {
        let topology = try Topology()
        defer { withExtendedLifetime(topology) {} }  // its deinit closes the sockets
        let (sender, from, receiver, to) = (topology.sender, topology.from, topology.receiver, topology.to)
        var direction = Direction(fromSide: .client, capacity: 4096, pipeSize: 65536, spliceAfter: 1024, now: 0)
        defer { direction.release() }
        // 100 round trips of 64 bytes: 6,400 bytes, six times the threshold, each read short.
        for round in 0..<100 {
            let message = (0..<64).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ round) }
            try sender.sendAll(message)
            guard case .awaitingRead = direction.pump(from: from, to: to) else {
                Issue.record("round \(round): the pump must have moved the message and wait to read")
                return
            }
            #expect(try receiver.receive(exactly: 64, timeout: .seconds(5)).bytes == message)
        }
        #expect(direction.bytes == 6400)
        #expect(!direction.isSplicing, "an exchange of small messages must not splice")
        // Then a bulk send: the first read fills the buffer, and the direction splices on.
        let bulk = (0..<(256 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9) }
        let sending = Thread { try? sender.sendAll(bulk, timeout: .seconds(30)) }
        sending.start()
        var received: [UInt8] = []
        let deadline = ContinuousClock.now + .seconds(30)
        while received.count < bulk.count, ContinuousClock.now < deadline {
            _ = direction.pump(from: from, to: to)
            if let chunk = try? receiver.receive(exactly: min(4096, bulk.count - received.count), timeout: .milliseconds(20)) {
                received += chunk.bytes
            }
        }
        #expect(received == bulk)
        #expect(direction.isSplicing, "a bulk transfer past the threshold splices")
    }

    @Test("A reset by the sender fails the direction on the sender's side", arguments: [0, 1])
    func reset(path: Int) throws {
        let topology = try Topology()
        defer { withExtendedLifetime(topology) {} }  // its deinit closes the sockets
        let (sender, from, to) = (topology.sender, topology.from, topology.to)
        var direction = Direction(fromSide: .client, capacity: 4096, pipeSize: Self.paths[path].pipeSize, spliceAfter: 0, now: 0)
        defer { direction.release() }
        try sender.sendAll(Array("partial".utf8))
        sender.reset()
        let outcome = pumpToEnd(&direction, from: from, to: to, timeout: .seconds(5))
        guard case .failed(let side, let error) = outcome else {
            Issue.record("outcome \(outcome): a reset must fail the direction")
            return
        }
        #expect(side == .client)
        #expect(error.errno == .connectionReset)
    }

    @Test("The last bytes before a FIN that is in leave in the FIN's segment; without the hint, in two")
    func lastBytesRideWithFIN() throws {
        var added: [Direction.ReadEdge: UInt32] = [:]
        for edge in [Direction.ReadEdge.bytesAndFIN, .unknown] {
            let topology = try Topology()
            defer { withExtendedLifetime(topology) {} }  // its deinit closes the sockets
            let (sender, from, receiver, to) = (topology.sender, topology.from, topology.receiver, topology.to)
            var direction = Self.copyingFromUpstream()
            defer { direction.release() }
            // A response and its FIN in one segment, as a server's write and close(2) often arrive.
            let response = Array("HTTP/1.0 204 No Content\r\n\r\n".utf8)
            try sender.sendWithFIN(response)
            var poller = pollfd(fd: from.fd, events: Int16(POLLIN) | 0x2000, revents: 0)  // POLLRDHUP
            let deadline = ContinuousClock.now + .seconds(5)
            while poller.revents & 0x2000 == 0, ContinuousClock.now < deadline { _ = poll(&poller, 1, 20) }
            #expect(poller.revents & 0x2000 != 0, "the FIN reached the relay's socket")
            let before = try #require(receiver.segmentsReceived)
            let outcome = direction.pump(from: from, to: to, edge: edge)
            guard case .finished = outcome else {
                Issue.record("\(edge): outcome \(outcome), expected the response and the EOF passed on at once")
                continue
            }
            let (bytes, end) = try receiver.receiveToEnd(timeout: .seconds(5))
            #expect(bytes == response && end == .eof, "\(edge)")
            added[edge] = try #require(receiver.segmentsReceived) &- before
        }
        #expect(added[.bytesAndFIN] == 1, "the response and the FIN in one segment")
        #expect(added[.unknown] == 2, "the response, then the FIN (what the hint saves)")
    }

    @Test("Copy path: a short read after an edge that says the FIN is in ends the direction, with no read of the EOF")
    func shortReadAfterFINEdgeIsTheEnd() throws {
        let sockets = try Topology()
        var direction = Self.copyingFromUpstream()
        defer { direction.release() }
        // Bytes and no FIN, with an edge that (untruly) says the FIN is in: the pump takes the
        // edge's word and never reads again, so it passes the EOF on at once. A read after the
        // short one would find nothing (EAGAIN) and leave the pump waiting to read.
        let response = Array("last bytes".utf8)
        try sockets.sender.sendAll(response)
        var poller = pollfd(fd: sockets.from.fd, events: Int16(POLLIN), revents: 0)
        #expect(poll(&poller, 1, 5000) == 1, "the bytes reached the relay's socket")
        let outcome = direction.pump(from: sockets.from, to: sockets.to, edge: .bytesAndFIN)
        guard case .finished = outcome else {
            Issue.record("outcome \(outcome): a short read after a FIN edge must end the direction")
            return
        }
        let (bytes, end) = try sockets.receiver.receiveToEnd(timeout: .seconds(5))
        #expect(bytes == response && end == .eof)
        #expect(sockets.from.unreadBytes() == 0)
        withExtendedLifetime(sockets) {}  // its deinit closes the sockets
    }

    @Test("A receiver that does not read stops the pump at its bound (back-pressure), and every byte arrives once it reads", arguments: [0, 1])
    func backPressure(path: Int) throws {
        let topology = try Topology(receiveBuffer: 65536)
        defer { withExtendedLifetime(topology) {} }  // its deinit closes the sockets
        let (sender, from, receiver, to) = (topology.sender, topology.from, topology.receiver, topology.to)
        try to.setOption(level: SOL_SOCKET, name: SO_SNDBUF, value: 4096)
        let capacity = 8192
        var direction = Direction(fromSide: .client, capacity: capacity, pipeSize: Self.paths[path].pipeSize, spliceAfter: 0, now: 0)
        defer { direction.release() }
        let payload = (0..<8_000_000).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
        let writer = Thread {
            try? sender.sendAll(payload, timeout: .seconds(60))
            sender.shutdownWrite()
        }
        writer.start()
        // Pump while the receiver reads nothing: the direction must end up waiting to write,
        // holding no more than its buffer (or pipe), with the sender held back by TCP.
        var outcome = Direction.Outcome.awaitingRead
        let deadline = ContinuousClock.now + .seconds(5)
        while ContinuousClock.now < deadline {
            outcome = direction.pump(from: from, to: to)
            if case .awaitingWrite = outcome { break }
            usleep(1000)
        }
        guard case .awaitingWrite = outcome else {
            Issue.record("outcome \(outcome): the pump should wait for the full receiver")
            return
        }
        #expect(direction.buffered <= max(capacity, Self.paths[path].pipeSize ?? 0))
        let held = direction.bytes
        for _ in 0..<20 { _ = direction.pump(from: from, to: to) }
        #expect(direction.bytes == held, "nothing moves while the receiver is full")
        #expect(direction.bytes < UInt64(payload.count / 2))
        // Now read: everything arrives, in order.
        let result = Mutex<[UInt8]>([])
        let readerThread = Thread {
            let bytes = (try? receiver.receiveToEnd(timeout: .seconds(60)))?.bytes ?? []
            result.withLock { $0 = bytes }
        }
        readerThread.start()
        guard case .finished = pumpToEnd(&direction, from: from, to: to, timeout: .seconds(60)) else {
            Issue.record("the direction did not finish once the receiver read")
            return
        }
        #expect(waitUntil(timeout: .seconds(30)) { result.withLock { $0.count } == payload.count })
        #expect(result.withLock { $0 } == payload)
    }
}
