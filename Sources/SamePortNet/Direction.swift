import Dispatch
import Glibc

/// One side of a relayed connection.
public enum Side: String, Sendable {
    case client
    case upstream
}

/// Moves the bytes of one direction of a connection, from one socket to the other.
///
/// Written once and used twice, as clientToUpstream and upstreamToClient. The buffer is bounded
/// and linear: the direction reads only into an empty buffer and writes all of it before reading
/// again, so while the receiving socket is full the sending socket's read source stays suspended
/// and the kernel's receive window pushes back on the sender (back-pressure).
///
/// EOF becomes shutdown(SHUT_WR) on the other socket once every pending byte is written; the
/// direction is then finished. A read or write error ends the direction with `failed`, naming the
/// side whose socket failed. The buffer is allocated on the first byte, so idle connections cost
/// no buffer memory.
///
/// Concurrency: confined to the connection's queue, like the channels it drives.
final class Direction: @unchecked Sendable {  // confined to the connection's queue
    enum Event {
        /// EOF was read and forwarded as a half-close.
        case finished
        /// A read or write failed; `side` is the socket that failed.
        case failed(side: Side, error: SystemError)
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
    private let capacity: Int
    private var buffer: UnsafeMutableRawBufferPointer?
    private var start = 0
    private var end = 0
    private var sawEOF = false

    /// Reads at most this many times per wake-up, so one busy connection cannot hold a thread.
    private static let readsPerWakeup = 16

    init(from: SocketChannel, fromSide: Side, to: SocketChannel, capacity: Int) {
        self.from = from
        self.fromSide = fromSide
        self.to = to
        self.capacity = capacity
        self.lastActivity = DispatchTime.now().uptimeNanoseconds
    }

    deinit {
        buffer?.deallocate()
    }

    /// Moves as many bytes as the sockets allow, then waits on the source that can unblock it.
    func pump() {
        var reads = 0
        while !isFinished, !from.isClosed, !to.isClosed {
            // Write everything buffered before reading more.
            while start < end {
                let result: IOResult<Int>
                do {
                    result = try to.socket.write(from: UnsafeRawBufferPointer(rebasing: buffer![start..<end]))  // end > 0 implies allocated
                } catch {
                    return fail(side: fromSide == .client ? .upstream : .client, error)
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
            if sawEOF {
                to.socket.shutdownWrite()
                isFinished = true
                onEvent?(.finished)
                return
            }
            if reads == Self.readsPerWakeup {
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

    private func allocatedBuffer() -> UnsafeMutableRawBufferPointer {
        if let buffer { return buffer }
        let allocated = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 16)
        buffer = allocated
        return allocated
    }

    private func fail(side: Side, _ error: SystemError) {
        isFinished = true
        onEvent?(.failed(side: side, error: error))
    }
}
