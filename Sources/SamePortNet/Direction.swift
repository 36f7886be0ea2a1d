import Dispatch
import Glibc

/// One side of a relayed connection.
public enum Side: String, Sendable {
    case client
    case upstream

    /// The other side.
    var other: Side { self == .client ? .upstream : .client }
}

/// Moves the bytes of one direction of a connection, from one socket to the other.
///
/// Written once and used twice, as clientToUpstream and upstreamToClient. Two paths move the
/// bytes, with the same rules:
/// - copy: read(2) into a buffer, send(2) from it. Every direction starts here, and with
///   `--splice off` stays here.
/// - splice: socket → pipe → socket with splice(2), the pages never copied through user space. A
///   direction switches to it once it has delivered `spliceAfter` bytes (256 KiB by default) and
///   its latest read filled at least half the buffer (a bulk transfer), with its buffer empty, so
///   nothing is reordered, and keeps it. Below that, copying is cheaper: opening, sizing and
///   closing a pipe costs more than the copies it saves (measured, see
///   `RelaySpec.defaultSpliceAfter`); and a stream of small messages (an interactive session, a
///   request-response protocol) copies for good, since a splice round (in, out, and the EAGAIN
///   splice) costs more than recv and send for a few bytes, and adds to their latency.
///   `spliceAfter` 0 splices from the first byte, whatever the reads.
///   A direction that cannot have a pipe (pipe2 failed: EMFILE, ENFILE), or only a shrunken one
///   (see `SplicePipe.isWorthSplicing`), or whose first splice the kernel refuses (EINVAL, ENOSYS,
///   EPERM from a seccomp filter) copies for the rest of its life.
///
/// Either way the buffer (the memory or the pipe, see `SplicePipe`) is bounded and used linearly:
/// the direction takes bytes in only when it is empty, and delivers all of it before taking more.
/// While the receiving socket is full the direction reads nothing, and the kernel's receive window
/// pushes back on the sender (back-pressure). The copy path reads into the thread's scratch and
/// writes straight on; its own buffer holds only what the receiver could not take, and is given
/// back once delivered, so an idle direction holds no memory.
///
/// `pump` moves as much as the sockets allow and says what it waits for: the sending socket to be
/// readable, the receiving one to be writable, its turn again (it yields after `roundsPerWakeup`
/// rounds so that one busy connection cannot hold its shard), or nothing (finished or failed).
/// The shard's sockets are edge-triggered: the pump always stops at EAGAIN (or yields), so the next
/// edge of what it waits for is what drives it again.
///
/// EOF becomes shutdown(SHUT_WR) on the other socket once every pending byte is delivered; the
/// direction is then finished. A read or write error ends the direction with `failed`, naming the
/// side whose socket failed. `bytes` counts bytes delivered to the receiving socket.
///
/// A plain value kept inside its `Connection`, on the connection's shard; `release()` gives its
/// buffer and pipe back.
struct Direction {
    /// What `pump` ended with.
    enum Outcome {
        /// Waiting for the sending socket to be readable.
        case awaitingRead
        /// Waiting for the receiving socket to be writable.
        case awaitingWrite
        /// More to do: pump again soon, without waiting for an event.
        case yielded
        /// EOF was read and forwarded as a half-close.
        case finished
        /// A read or write failed; `side` is the socket that failed.
        case failed(side: Side, error: SystemError)
    }

    private enum Path: UInt8 {
        case splice
        case copy
    }

    /// What the direction waits for before it can move bytes again.
    enum Wait: UInt8 {
        case nothing
        case read
        case write
    }

    let fromSide: Side
    /// Bytes written to the receiving socket.
    private(set) var bytes: UInt64 = 0
    /// When bytes last moved either way through this direction, in DispatchTime uptime
    /// nanoseconds. Writes count too: a slow reader being fed is not idle.
    private(set) var lastActivity: UInt64
    private(set) var isFinished = false
    private(set) var waitingFor = Wait.nothing
    /// Set when the direction gave up splicing, with why: the connection logs it (once per process).
    var spliceRefusal: String?

    /// The receiving socket's send queue when last looked at, for `noteKernelProgress`.
    private var unsentAtLastLook: Int32 = -1
    private var sawEOF = false
    /// Whether the latest write held its bytes for a FIN (see `ReadEdge.bytesAndFIN`).
    private var holdsForFIN = false
    private var closesAtEOF = false
    /// What the edge that runs the current pump said (see `ReadEdge`).
    private var edge = ReadEdge.unknown
    /// Whether the latest read filled at least half the buffer: the sender is ahead of the relay
    /// (a bulk transfer), not exchanging small messages.
    private var lastReadWasBulk = false
    private var path = Path.copy
    /// Whether a splice into (out of) the pipe has ever moved a byte: only the first splice's
    /// refusal means that splice is unavailable; a later one is an error.
    private var splicedIn = false
    private var splicedOut = false
    /// Set by `leaveSplice`: the splice path hands over to the copy path once its pipe is empty.
    private var leavingSplice = false
    // Stored narrow, read through the properties below: a direction is kept for every open
    // connection, idle or not, twice.
    private var spliceAtStored = UInt64.max
    private var capacityStored: Int32
    private var bufferStored: UnsafeMutableRawPointer?
    private var startStored: Int32 = 0
    private var endStored: Int32 = 0
    private let pipeSizeStored: Int32
    private var pipeBytesStored: Int32 = 0

    /// Switch to splice once `bytes` reaches this; nil: copy for good.
    private var spliceAt: UInt64? {
        get { spliceAtStored == .max ? nil : spliceAtStored }
        set { spliceAtStored = newValue ?? .max }
    }

    // The copy path: `buffer[start..<end]` is read and not yet written.
    private var capacity: Int {
        get { Int(capacityStored) }
        set { capacityStored = Int32(clamping: newValue) }
    }
    private var buffer: UnsafeMutableRawBufferPointer? {
        get { bufferStored.map { UnsafeMutableRawBufferPointer(start: $0, count: capacity) } }
        set { bufferStored = newValue?.baseAddress }
    }
    private var start: Int {
        get { Int(startStored) }
        set { startStored = Int32(truncatingIfNeeded: newValue) }
    }
    private var end: Int {
        get { Int(endStored) }
        set { endStored = Int32(truncatingIfNeeded: newValue) }
    }

    // The splice path: the pipe holds `pipeBytes` bytes spliced in and not yet spliced out.
    private var pipeSize: Int { Int(pipeSizeStored) }
    /// Open while the direction splices.
    private var pipe: SplicePipe?
    private var pipeBytes: Int {
        get { Int(pipeBytesStored) }
        set { pipeBytesStored = Int32(truncatingIfNeeded: newValue) }
    }

    /// Fills (and empties) the buffer or pipe at most this many times per wake-up, so one busy
    /// connection cannot hold its shard.
    private static let roundsPerWakeup = 16

    /// - Parameters:
    ///   - capacity: the copy path's buffer size.
    ///   - pipeSize: the size asked for the splice path's pipe; nil to copy only.
    ///   - spliceAfter: with a pipe size, the bytes to copy before splicing.
    init(fromSide: Side, capacity: Int, pipeSize: Int?, spliceAfter: UInt64, now: UInt64) {
        self.fromSide = fromSide
        self.capacityStored = Int32(clamping: capacity)
        self.pipeSizeStored = Int32(clamping: pipeSize ?? 0)
        self.spliceAtStored = pipeSize == nil ? .max : spliceAfter
        self.lastActivity = now
    }

    /// What the readable edge that runs a pump said about the sending socket.
    enum ReadEdge: UInt8 {
        /// Not run by a readable edge, or by one that said the peer reset or sent urgent data
        /// (EPOLLERR, EPOLLHUP without EPOLLRDHUP, EPOLLPRI): read on to EAGAIN or EOF.
        case unknown
        /// Bytes, and nothing said about a close: a read that returns less than asked has emptied
        /// the socket, and the EAGAIN read that would prove it is skipped. Bytes or a FIN that
        /// arrive later raise a new edge.
        case bytes
        /// The peer's FIN is in (EPOLLRDHUP): a read that returns less than asked has left only
        /// the EOF, so those bytes are sent with MSG_MORE, and the FIN that `forwardEOF` sends
        /// right after leaves in the same segment: one packet and one wake-up of the receiver
        /// fewer per connection that ends with its last bytes (a response and its close). On the
        /// copy path the read that would return 0 is skipped too. Sound because the flags are
        /// the socket's state when epoll reported it: the FIN was queued behind every byte
        /// before it, nothing can follow it, and without EPOLLPRI no urgent mark stops a read
        /// short. (A splice can stop short at a full pipe, so that path still reads the EOF.)
        case bytesAndFIN
    }

    /// Moves as many bytes as the sockets allow, from `from` to `to`; says what it waits for.
    ///
    /// - Parameter edge: what the readable edge that runs the pump said (see `ReadEdge`). Never
    ///   anything but `.unknown` for a pump started otherwise: an edge consumed while the
    ///   direction waited to write may have carried a FIN.
    /// - Parameter closesAtEOF: the caller closes `to` as soon as this direction finishes (the
    ///   other one has): the EOF is then passed on by close(2), which sends the same FIN, and the
    ///   shutdown(2) is skipped.
    mutating func pump(from: Socket, to: Socket, edge: ReadEdge = .unknown, closesAtEOF: Bool = false) -> Outcome {
        guard !isFinished else { return .finished }
        self.closesAtEOF = closesAtEOF
        self.edge = edge
        let outcome: Outcome
        switch path {
        case .splice: outcome = pumpSplice(from: from, to: to, rounds: 0)
        case .copy: outcome = pumpCopy(from: from, to: to, rounds: 0)
        }
        if holdsForFIN {
            // The bytes held for a FIN leave with it when the direction finishes (or fails, and
            // the socket is closed); should it wait to read instead (a socket whose FIN is in
            // reads EOF, never EAGAIN), they leave now. A yielded pump reads on soon.
            switch outcome {
            case .awaitingRead: to.push(); holdsForFIN = false
            case .yielded: break
            case .awaitingWrite, .finished, .failed: holdsForFIN = false
            }
        }
        switch outcome {
        case .awaitingRead: waitingFor = .read
        case .awaitingWrite: waitingFor = .write
        case .yielded, .finished, .failed: waitingFor = .nothing
        }
        return outcome
    }

    /// Waits for the sending socket to be readable without reading it first: the caller knows it
    /// holds nothing yet (its event said so), and edge-triggered epoll reports the bytes to come.
    mutating func awaitRead() {
        guard !isFinished, waitingFor == .nothing, buffered == 0 else { return }
        waitingFor = .read
    }

    /// Copies for good from now on: the sending socket has urgent data (EPOLLPRI). Linux's splice
    /// from a TCP socket stops at the urgent mark and never passes it (it returns EAGAIN there with
    /// bytes waiting, and no new edge comes), while read(2) steps over it. What is already in the
    /// pipe is delivered first.
    mutating func leaveSplice() {
        spliceAt = nil
        if path == .splice { leavingSplice = true }
    }

    /// Queues `bytes` to be delivered before anything this direction reads: the part of a PROXY
    /// header that the receiving socket did not take at once. Before the first pump only, while
    /// the buffer is empty; `bytes` counts them when they are delivered.
    mutating func preload(_ bytes: some Collection<UInt8>) {
        guard buffered == 0, bytes.count <= capacity else { return }
        let buffer = allocatedBuffer()
        buffer.copyBytes(from: bytes)
        start = 0
        end = bytes.count
    }

    /// Bytes taken in and not yet delivered (in the buffer or the pipe).
    var buffered: Int { end - start + pipeBytes }

    /// Whether the direction moves its bytes with splice(2) now.
    var isSplicing: Bool { path == .splice }

    /// Gives back the buffer and the pipe: the connection has ended.
    mutating func release() {
        buffer?.deallocate()
        buffer = nil
        start = 0
        end = 0
        releasePipe()
    }

    private mutating func releasePipe() {
        pipe?.close()
        pipe = nil
        pipeBytes = 0
    }

    private static var now: UInt64 { Monotonic.now }

    // MARK: The splice path

    private mutating func pumpSplice(from: Socket, to: Socket, rounds startingRounds: Int) -> Outcome {
        guard let pipe else {
            path = .copy  // cannot happen: the pipe is open while the path is splice
            return pumpCopy(from: from, to: to, rounds: startingRounds)
        }
        var rounds = startingRounds
        while true {
            // Deliver everything in the pipe before taking more in.
            while pipeBytes > 0 {
                let result: IOResult<Int>
                do {
                    result = try pipe.drain(to: to, count: pipeBytes, more: holdsForFIN)
                } catch {
                    if !splicedOut, Self.refusesSplice(error) { return fallBackToCopy(error, from: from, to: to, rounds: rounds) }
                    return fail(side: fromSide.other, error)
                }
                switch result {
                case .processed(0):
                    // The pipe is empty although it should hold pipeBytes: never silently.
                    return fail(side: fromSide.other, SystemError("splice (\(pipeBytes) bytes missing from the pipe)", .ioError))
                case .processed(let moved):
                    splicedOut = true
                    pipeBytes -= moved
                    bytes += UInt64(moved)
                    lastActivity = Self.now
                case .wouldBlock:
                    return .awaitingWrite
                }
            }
            if sawEOF { return forwardEOF(to: to) }
            if leavingSplice {
                // Nothing is in the pipe: the copy path goes on from the same place in the stream.
                releasePipe()
                path = .copy
                return pumpCopy(from: from, to: to, rounds: rounds)
            }
            if rounds == Self.roundsPerWakeup { return .yielded }
            rounds += 1
            // The pipe is empty here: one splice takes what the socket holds, up to a full pipe
            // (the kernel walks the whole receive queue in one call).
            let result: IOResult<Int>
            do {
                result = try pipe.fill(from: from, count: pipe.capacity)
            } catch {
                if !splicedIn, Self.refusesSplice(error) { return fallBackToCopy(error, from: from, to: to, rounds: rounds) }
                return fail(side: fromSide, error)
            }
            switch result {
            case .processed(0) where from.unreadBytes() > 0:
                // Not the end: splice stopped at urgent data that arrived with the peer's FIN.
                leavingSplice = true
            case .processed(0):
                sawEOF = true
            case .processed(let count):
                splicedIn = true
                pipeBytes = count
                lastActivity = Self.now
                // As the copy path does: the last bytes before a FIN that is in wait for it.
                holdsForFIN = edge == .bytesAndFIN && count < pipe.capacity
            case .wouldBlock:
                // The pipe is empty, so it is the socket that is.
                return .awaitingRead
            }
        }
    }

    /// Whether a splice error means the kernel will not splice these files at all.
    private static func refusesSplice(_ error: SystemError) -> Bool {
        [.invalidArgument, .notImplemented, .notPermitted].contains(error.errno)
    }

    /// Opens the pipe and splices from now on; copies for good if no pipe can be had. The buffer
    /// is empty: it is given back.
    private mutating func startSplicing(from: Socket, to: Socket, rounds: Int) -> Outcome {
        spliceAt = nil
        let pipe: SplicePipe
        do {
            pipe = try SplicePipe(size: pipeSize)
        } catch {
            spliceRefusal = "\(error)"
            return pumpCopy(from: from, to: to, rounds: rounds)
        }
        guard pipe.isWorthSplicing(asked: pipeSize) else {
            pipe.close()
            spliceRefusal = "the kernel granted a \(pipe.capacity)-byte pipe (pipe-user-pages-soft reached?)"
            return pumpCopy(from: from, to: to, rounds: rounds)
        }
        self.pipe = pipe
        buffer?.deallocate()
        buffer = nil
        path = .splice
        return pumpSplice(from: from, to: to, rounds: rounds)
    }

    /// Switches this direction to the copy path for good, keeping the bytes already in the pipe.
    private mutating func fallBackToCopy(_ reason: SystemError, from: Socket, to: Socket, rounds: Int) -> Outcome {
        path = .copy
        spliceAt = nil
        if let pipe, pipeBytes > 0 {
            // Splicing in worked and splicing out was refused: read the pipe into the buffer,
            // which grows to hold it (once; the bound stays the larger of the two sizes).
            capacity = max(capacity, pipeBytes)
            let buffer = allocatedBuffer()
            while end < pipeBytes {
                switch try? pipe.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[end..<pipeBytes])) {
                case .processed(let count) where count > 0:
                    end += count
                default:
                    return fail(side: fromSide.other, reason)
                }
            }
        }
        releasePipe()
        spliceRefusal = "\(reason)"
        return pumpCopy(from: from, to: to, rounds: rounds)
    }

    // MARK: The copy path

    private mutating func pumpCopy(from: Socket, to: Socket, rounds startingRounds: Int) -> Outcome {
        var reads = startingRounds
        while true {
            // Write everything buffered before reading more.
            if let buffer, start < end {
                while start < end {
                    let result: IOResult<Int>
                    do {
                        result = try to.write(from: UnsafeRawBufferPointer(rebasing: buffer[start..<end]))
                    } catch {
                        return fail(side: fromSide.other, error)
                    }
                    switch result {
                    case .processed(let written):
                        start += written
                        bytes += UInt64(written)
                        lastActivity = Self.now
                    case .wouldBlock:
                        return .awaitingWrite
                    }
                }
                // Delivered: an idle direction holds no buffer.
                buffer.deallocate()
                self.buffer = nil
            }
            start = 0
            end = 0
            if sawEOF { return forwardEOF(to: to) }
            if reads == Self.roundsPerWakeup { return .yielded }
            if let spliceAt, bytes >= spliceAt, spliceAt == 0 || lastReadWasBulk {
                return startSplicing(from: from, to: to, rounds: reads)
            }
            reads += 1
            // With nothing held, read into the thread's scratch and write straight on (see
            // `ScratchBuffer`); the direction's own buffer is for what the receiver cannot take.
            let scratch = ScratchBuffer.current(size: capacity)
            let target = scratch ?? allocatedBuffer()
            let result: IOResult<Int>
            do {
                result = try from.read(into: target)
            } catch {
                return fail(side: fromSide, error)
            }
            switch result {
            case .processed(0):
                sawEOF = true
            case .processed(let count):
                lastActivity = Self.now
                lastReadWasBulk = count >= capacity / 2
                guard let scratch else {
                    end = count  // read into the direction's own buffer: written at the loop's top
                    continue
                }
                // The last bytes before a FIN that is already in: held for the FIN (MSG_MORE),
                // which `forwardEOF` sends right after.
                holdsForFIN = edge == .bytesAndFIN && count < scratch.count
                let written: Int
                switch writeThrough(UnsafeRawBufferPointer(rebasing: scratch[0..<count]), to: to, more: holdsForFIN) {
                case .success(let count): written = count
                case .failure(let error): return fail(side: fromSide.other, error)
                }
                if written < count {
                    // The receiver is full: keep the rest, and wait for it to drain (writing it
                    // again now would only return EAGAIN).
                    let rest = allocatedBuffer()
                    rest.copyMemory(from: UnsafeRawBufferPointer(rebasing: scratch[written..<count]))
                    start = 0
                    end = count - written
                    return .awaitingWrite
                }
                // Only the FIN is left (see `ReadEdge.bytesAndFIN`): the read that would return 0
                // is skipped, and the FIN follows the held bytes at once.
                if holdsForFIN {
                    sawEOF = true
                    continue
                }
                if edge == .bytes, count < scratch.count { return .awaitingRead }
            case .wouldBlock:
                return .awaitingRead
            }
        }
    }

    /// Writes `bytes` to the receiving socket until it is full; how many it took. `more`: with
    /// MSG_MORE (see `ReadEdge.bytesAndFIN`).
    private mutating func writeThrough(_ bytes: UnsafeRawBufferPointer, to: Socket, more: Bool) -> Result<Int, SystemError> {
        var written = 0
        while written < bytes.count {
            let result: IOResult<Int>
            do {
                result = try to.write(from: UnsafeRawBufferPointer(rebasing: bytes[written...]), more: more)
            } catch {
                return .failure(error)
            }
            switch result {
            case .processed(let count):
                written += count
                self.bytes += UInt64(count)
            case .wouldBlock:
                return .success(written)
            }
        }
        return .success(written)
    }

    private mutating func allocatedBuffer() -> UnsafeMutableRawBufferPointer {
        if let buffer { return buffer }
        let allocated = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 16)
        buffer = allocated
        return allocated
    }

    // MARK: Both paths

    /// Counts the kernel delivering what this direction already wrote to `to` as activity.
    ///
    /// While the receiver reads slowly, the relay waits for the socket to become writable, which
    /// the kernel reports only once much of its send queue is free; the bytes still move. A send
    /// queue that shrank (or grew) since the last look is progress; one that stayed put is not.
    /// The first look is only a baseline. Returns whether the queue holds bytes.
    @discardableResult
    mutating func noteKernelProgress(to: Socket) -> Bool {
        let unsent = Int32(clamping: to.unsentBytes())
        if unsentAtLastLook >= 0, unsent != unsentAtLastLook { lastActivity = Self.now }
        unsentAtLastLook = unsent
        return unsent > 0
    }

    /// Every byte before the EOF is delivered: pass the EOF on as a half-close.
    private mutating func forwardEOF(to: Socket) -> Outcome {
        if !closesAtEOF { to.shutdownWrite() }
        isFinished = true
        releasePipe()
        return .finished
    }

    private mutating func fail(side: Side, _ error: SystemError) -> Outcome {
        isFinished = true
        return .failed(side: side, error: error)
    }
}
