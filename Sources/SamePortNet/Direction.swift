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
///   direction switches to it once it has delivered `spliceAfter` bytes (256 KiB by default), with
///   its buffer empty, so nothing is reordered, and keeps it. Below that, copying is cheaper:
///   opening, sizing and closing a pipe costs more than the copies it saves (measured, see
///   `RelaySpec.defaultSpliceAfter`).
///   A direction that cannot have a pipe (pipe2 failed: EMFILE, ENFILE), or only a shrunken one
///   (see `SplicePipe.isWorthSplicing`), or whose first splice the kernel refuses (EINVAL, ENOSYS,
///   EPERM from a seccomp filter) copies for the rest of its life.
///
/// Either way the buffer (the memory or the pipe, see `SplicePipe`) is bounded and used linearly:
/// the direction takes bytes in only when it is empty, and delivers all of it before taking more.
/// While the receiving socket is full the sending socket's read source stays suspended, and the
/// kernel's receive window pushes back on the sender (back-pressure).
///
/// EOF becomes shutdown(SHUT_WR) on the other socket once every pending byte is delivered; the
/// direction is then finished. A read or write error ends the direction with `failed`, naming the
/// side whose socket failed. `bytes` counts bytes delivered to the receiving socket.
///
/// Concurrency: confined to the connection's queue, like the channels it drives.
final class Direction: @unchecked Sendable {  // confined to the connection's queue
    enum Event {
        /// EOF was read and forwarded as a half-close.
        case finished
        /// A read or write failed; `side` is the socket that failed.
        case failed(side: Side, error: SystemError)
        /// splice(2) cannot be used (`cause` says why): the direction copies from now on.
        case spliceUnavailable(cause: String)
    }

    private enum Path {
        case splice
        case copy
    }

    let from: SocketChannel
    let to: SocketChannel
    let fromSide: Side
    /// Called on the connection's queue when the direction finishes or fails.
    var onEvent: ((Event) -> Void)?
    /// Bytes written to `to`: delivered to the receiving socket.
    private(set) var bytes: UInt64 = 0
    /// When bytes last moved either way through this direction, in DispatchTime uptime
    /// nanoseconds. Writes count too: a slow reader being fed is not idle.
    private(set) var lastActivity: UInt64
    private(set) var isFinished = false

    /// The receiving socket's send queue when last looked at, for `noteKernelProgress`.
    private var unsentAtLastLook = -1
    private var sawEOF = false
    private var path = Path.copy
    /// Switch to splice once `bytes` reaches this; nil: copy for good.
    private var spliceAt: UInt64?

    // The copy path: `buffer[start..<end]` is read and not yet written.
    private var capacity: Int
    private var buffer: UnsafeMutableRawBufferPointer?
    private var start = 0
    private var end = 0

    // The splice path: the pipe holds `pipeBytes` bytes spliced in and not yet spliced out.
    private let pipeSize: Int
    /// Open while the direction splices.
    private var pipe: SplicePipe?
    private var pipeBytes = 0
    /// Whether a splice into (out of) the pipe has ever moved a byte: only the first splice's
    /// refusal means that splice is unavailable; a later one is an error.
    private var splicedIn = false
    private var splicedOut = false

    /// Fills (and empties) the buffer or pipe at most this many times per wake-up, so one busy
    /// connection cannot hold a thread.
    private static let roundsPerWakeup = 16

    /// - Parameters:
    ///   - capacity: the copy path's buffer size.
    ///   - pipeSize: the size asked for the splice path's pipe; nil to copy only.
    ///   - spliceAfter: with a pipe size, the bytes to copy before splicing.
    init(from: SocketChannel, fromSide: Side, to: SocketChannel, capacity: Int, pipeSize: Int?, spliceAfter: UInt64) {
        self.from = from
        self.fromSide = fromSide
        self.to = to
        self.capacity = capacity
        self.pipeSize = pipeSize ?? 0
        self.spliceAt = pipeSize == nil ? nil : spliceAfter
        self.lastActivity = DispatchTime.now().uptimeNanoseconds
    }

    deinit {
        buffer?.deallocate()
        pipe?.close()
    }

    /// Moves as many bytes as the sockets allow, then waits on the source that can unblock it.
    func pump() {
        switch path {
        case .splice: pumpSplice(rounds: 0)
        case .copy: pumpCopy(rounds: 0)
        }
    }

    /// Closes the pipe, if any: the connection has ended (or this direction has).
    func releasePipe() {
        pipe?.close()
        pipe = nil
        pipeBytes = 0
    }

    // MARK: The splice path

    private func pumpSplice(rounds startingRounds: Int) {
        guard let pipe else {
            path = .copy  // cannot happen: the pipe is open while the path is splice
            return pumpCopy(rounds: startingRounds)
        }
        var rounds = startingRounds
        while !isFinished, !from.isClosed, !to.isClosed {
            // Deliver everything in the pipe before taking more in.
            while pipeBytes > 0 {
                let result: IOResult<Int>
                do {
                    result = try pipe.drain(to: to.socket, count: pipeBytes)
                } catch {
                    if !splicedOut, Self.refusesSplice(error) { return fallBackToCopy(error, rounds: rounds) }
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
                    lastActivity = DispatchTime.now().uptimeNanoseconds
                case .wouldBlock:
                    from.setReading(false)
                    to.setWriting(true)
                    return
                }
            }
            to.setWriting(false)
            if sawEOF { return forwardEOF() }
            if rounds == Self.roundsPerWakeup {
                // Yield the thread, and come back without waiting for an event: the source may
                // not fire again when all that is left is EOF.
                from.queue.async { [self] in pump() }
                return
            }
            rounds += 1
            // The pipe is empty here: one splice takes what the socket holds, up to a full pipe
            // (the kernel walks the whole receive queue in one call).
            let result: IOResult<Int>
            do {
                result = try pipe.fill(from: from.socket, count: pipe.capacity)
            } catch {
                if !splicedIn, Self.refusesSplice(error) { return fallBackToCopy(error, rounds: rounds) }
                return fail(side: fromSide, error)
            }
            switch result {
            case .processed(0):
                sawEOF = true
                from.setReading(false)
            case .processed(let count):
                splicedIn = true
                pipeBytes = count
                lastActivity = DispatchTime.now().uptimeNanoseconds
            case .wouldBlock:
                // The pipe is empty, so it is the socket that is.
                from.setReading(true)
                return
            }
        }
    }

    /// Whether a splice error means the kernel will not splice these files at all.
    private static func refusesSplice(_ error: SystemError) -> Bool {
        [.invalidArgument, .notImplemented, .notPermitted].contains(error.errno)
    }

    /// Opens the pipe and splices from now on; copies for good if no pipe can be had. The buffer
    /// is empty: it is given back.
    private func startSplicing(rounds: Int) {
        spliceAt = nil
        let pipe: SplicePipe
        do {
            pipe = try SplicePipe(size: pipeSize)
        } catch {
            onEvent?(.spliceUnavailable(cause: "\(error)"))
            return pumpCopy(rounds: rounds)
        }
        guard pipe.isWorthSplicing(asked: pipeSize) else {
            pipe.close()
            onEvent?(.spliceUnavailable(cause: "the kernel granted a \(pipe.capacity)-byte pipe (pipe-user-pages-soft reached?)"))
            return pumpCopy(rounds: rounds)
        }
        self.pipe = pipe
        buffer?.deallocate()
        buffer = nil
        path = .splice
        pumpSplice(rounds: rounds)
    }

    /// Switches this direction to the copy path for good, keeping the bytes already in the pipe.
    private func fallBackToCopy(_ reason: SystemError, rounds: Int) {
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
        onEvent?(.spliceUnavailable(cause: "\(reason)"))
        pumpCopy(rounds: rounds)
    }

    // MARK: The copy path

    private func pumpCopy(rounds startingRounds: Int) {
        var reads = startingRounds
        while !isFinished, !from.isClosed, !to.isClosed {
            // Write everything buffered before reading more.
            while start < end, let buffer {
                let result: IOResult<Int>
                do {
                    result = try to.socket.write(from: UnsafeRawBufferPointer(rebasing: buffer[start..<end]))
                } catch {
                    return fail(side: fromSide.other, error)
                }
                switch result {
                case .processed(let written):
                    start += written
                    bytes += UInt64(written)
                    lastActivity = DispatchTime.now().uptimeNanoseconds
                case .wouldBlock:
                    from.setReading(false)
                    to.setWriting(true)
                    return
                }
            }
            start = 0
            end = 0
            to.setWriting(false)
            if sawEOF { return forwardEOF() }
            if reads == Self.roundsPerWakeup {
                // Yield the thread, and come back without waiting for an event: the source may
                // not fire again when all that is left is EOF.
                from.queue.async { [self] in pump() }
                return
            }
            if let spliceAt, bytes >= spliceAt { return startSplicing(rounds: reads) }
            reads += 1
            // With nothing held, read into the thread's scratch and write straight on (see
            // `ScratchBuffer`); the direction's own buffer is for what the receiver cannot take.
            let scratch = buffer == nil ? ScratchBuffer.current(size: capacity) : nil
            let result: IOResult<Int>
            do {
                result = try from.socket.read(into: scratch ?? allocatedBuffer())
            } catch {
                return fail(side: fromSide, error)
            }
            switch result {
            case .processed(0):
                sawEOF = true
                from.setReading(false)
            case .processed(let count):
                lastActivity = DispatchTime.now().uptimeNanoseconds
                guard let scratch else {
                    end = count
                    continue
                }
                guard let written = writeThrough(UnsafeRawBufferPointer(rebasing: scratch[0..<count])) else { return }
                if written < count {
                    // The receiver is full: keep the rest, and wait for it to drain (writing it
                    // again now would only return EAGAIN).
                    let rest = allocatedBuffer()
                    rest.copyMemory(from: UnsafeRawBufferPointer(rebasing: scratch[written..<count]))
                    start = 0
                    end = count - written
                    from.setReading(false)
                    to.setWriting(true)
                    return
                }
            case .wouldBlock:
                from.setReading(true)
                return
            }
        }
    }

    /// Writes `bytes` to the receiving socket until it is full; how many it took, or nil when the
    /// write failed (the direction has failed).
    private func writeThrough(_ bytes: UnsafeRawBufferPointer) -> Int? {
        var written = 0
        while written < bytes.count {
            let result: IOResult<Int>
            do {
                result = try to.socket.write(from: UnsafeRawBufferPointer(rebasing: bytes[written...]))
            } catch {
                fail(side: fromSide.other, error)
                return nil
            }
            switch result {
            case .processed(let count):
                written += count
                self.bytes += UInt64(count)
            case .wouldBlock:
                return written
            }
        }
        return written
    }

    /// Gives back the copy path's buffer when it holds nothing: called for a connection that has
    /// been idle for a watchdog interval, so that an idle connection holds no buffer (it is
    /// allocated again on the next byte). Never on the hot path.
    func releaseIdleBuffer() {
        guard let buffer, start == end else { return }
        buffer.deallocate()
        self.buffer = nil
        start = 0
        end = 0
    }

    private func allocatedBuffer() -> UnsafeMutableRawBufferPointer {
        if let buffer { return buffer }
        let allocated = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 16)
        buffer = allocated
        return allocated
    }

    // MARK: Both paths

    /// Counts the kernel delivering what this direction already wrote as activity.
    ///
    /// While the receiver reads slowly, the relay waits for the socket to become writable, which
    /// the kernel reports only once much of its send queue is free; the bytes still move. A send
    /// queue that shrank (or grew) since the last look is progress; one that stayed put is not.
    func noteKernelProgress() {
        let unsent = to.socket.unsentBytes()
        if unsent != unsentAtLastLook {
            if unsentAtLastLook > 0 || unsent > 0 { lastActivity = DispatchTime.now().uptimeNanoseconds }
            unsentAtLastLook = unsent
        }
    }

    /// Every byte before the EOF is delivered: pass the EOF on as a half-close.
    private func forwardEOF() {
        to.socket.shutdownWrite()
        isFinished = true
        releasePipe()
        onEvent?(.finished)
    }

    private func fail(side: Side, _ error: SystemError) {
        isFinished = true
        onEvent?(.failed(side: side, error: error))
    }
}
