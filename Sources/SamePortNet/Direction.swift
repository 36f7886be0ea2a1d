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
/// - splice (the default on Linux): socket → pipe → socket with splice(2), the pages never copied
///   through user space. The pipe (see `SplicePipe`) is opened when the first byte arrives, so an
///   idle direction holds no pipe.
/// - copy: read(2) into a buffer, send(2) from it. The fallback when there is no pipe to be had
///   (pipe2 failed: EMFILE, ENFILE) or the kernel refuses the first splice (EINVAL, ENOSYS,
///   EPERM from a seccomp filter), and the only path with `--splice off`. A direction that falls
///   back copies for the rest of its life.
///
/// Either way the buffer (the pipe or the memory) is bounded and used linearly: the direction
/// takes bytes in only when it is empty, and delivers all of it before taking more. While the
/// receiving socket is full the sending socket's read source stays suspended, and the kernel's
/// receive window pushes back on the sender (back-pressure).
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
        /// splice(2) cannot be used (the error says why): the direction copies from now on.
        case spliceUnavailable(SystemError)
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
    private var path: Path

    // The copy path: `buffer[start..<end]` is read and not yet written.
    private var capacity: Int
    private var buffer: UnsafeMutableRawBufferPointer?
    private var start = 0
    private var end = 0

    // The splice path: the pipe holds `pipeBytes` bytes spliced in and not yet spliced out.
    private let pipeSize: Int
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
    init(from: SocketChannel, fromSide: Side, to: SocketChannel, capacity: Int, pipeSize: Int?) {
        self.from = from
        self.fromSide = fromSide
        self.to = to
        self.capacity = capacity
        self.pipeSize = pipeSize ?? 0
        self.path = pipeSize == nil ? .copy : .splice
        self.lastActivity = DispatchTime.now().uptimeNanoseconds
    }

    deinit {
        buffer?.deallocate()
        pipe?.close()
    }

    /// Moves as many bytes as the sockets allow, then waits on the source that can unblock it.
    func pump() {
        switch path {
        case .splice: pumpSplice()
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

    private func pumpSplice() {
        var rounds = 0
        while !isFinished, !from.isClosed, !to.isClosed {
            // Deliver everything in the pipe before taking more in.
            while pipeBytes > 0, let pipe {
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
            let pipe: SplicePipe
            if let existing = self.pipe {
                pipe = existing
            } else {
                // Open the pipe only for bytes: an idle direction holds no pipe.
                let waiting: IOResult<Bool>
                do {
                    waiting = try from.socket.peekForBytes()
                } catch {
                    return fail(side: fromSide, error)
                }
                switch waiting {
                case .processed(true):
                    do {
                        pipe = try SplicePipe(size: pipeSize)
                    } catch {
                        return fallBackToCopy(error, rounds: rounds)
                    }
                    self.pipe = pipe
                case .processed(false):
                    sawEOF = true
                    from.setReading(false)
                    continue
                case .wouldBlock:
                    from.setReading(true)
                    return
                }
            }
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

    /// Switches this direction to the copy path for good, keeping the bytes already in the pipe.
    private func fallBackToCopy(_ reason: SystemError, rounds: Int) {
        path = .copy
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
        onEvent?(.spliceUnavailable(reason))
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
            reads += 1
            let result: IOResult<Int>
            do {
                result = try from.socket.read(into: allocatedBuffer())
            } catch {
                return fail(side: fromSide, error)
            }
            switch result {
            case .processed(0):
                sawEOF = true
                from.setReading(false)
            case .processed(let count):
                end = count
                lastActivity = DispatchTime.now().uptimeNanoseconds
            case .wouldBlock:
                from.setReading(true)
                return
            }
        }
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
