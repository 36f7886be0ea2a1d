import Dispatch
import Glibc

/// A connected socket with the one read source and one write source it keeps for its whole life.
///
/// Design note (libdispatch on Linux, see kernel-facts.md):
/// - Sources are one-shot epoll registrations re-armed after each handler; a handler that does not
///   drain the socket fires again at once, so back-pressure suspends the source instead.
/// - A suspended source's cancel handler runs only after `resume()`, and releasing a suspended
///   source crashes: `isReading`/`isWriting` track the suspension so that `close` can resume first.
/// - The fd is closed only from the cancel handler of the last source to be cancelled: closing any
///   earlier races with the event loop ("Do not close random Unix descriptors").
/// - Creating and cancelling sources quickly on recycled fd numbers trips open libdispatch bugs
///   (swift-corelibs-libdispatch #833, #949); one pair of sources per fd for its whole life keeps
///   that churn to the minimum.
///
/// Concurrency: every method is called on `queue`, and both sources deliver to it.
final class SocketChannel: @unchecked Sendable {  // confined to `queue`
    let socket: Socket
    let queue: DispatchQueue
    /// Called on `queue` when the socket is readable (or has EOF or an error pending).
    var onReadable: (() -> Void)?
    /// Called on `queue` when the socket is writable (or a connect finished).
    var onWritable: (() -> Void)?

    private let readSource: DispatchSourceRead
    private let writeSource: DispatchSourceWrite
    /// New sources are inactive, which counts as suspended: the first resume activates them.
    private(set) var isReading = false
    private(set) var isWriting = false
    private(set) var isClosed = false
    private var pendingCancels = 2

    init(socket: Socket, queue: DispatchQueue) {
        self.socket = socket
        self.queue = queue
        readSource = DispatchSource.makeReadSource(fileDescriptor: socket.fd, queue: queue)
        writeSource = DispatchSource.makeWriteSource(fileDescriptor: socket.fd, queue: queue)
        readSource.setEventHandler { [unowned self] in
            if !isClosed { onReadable?() }
        }
        writeSource.setEventHandler { [unowned self] in
            if !isClosed { onWritable?() }
        }
        // Both cancel handlers run on the serial `queue`; the second one to run closes the fd.
        // They hold the channel strongly, so it lives until the fd is closed.
        let finish: @Sendable () -> Void = { [self] in
            pendingCancels -= 1
            if pendingCancels == 0 {
                socket.close()
                onReadable = nil
                onWritable = nil
            }
        }
        readSource.setCancelHandler(handler: finish)
        writeSource.setCancelHandler(handler: finish)
    }

    /// Resumes or suspends the read source, keeping suspend and resume balanced.
    func setReading(_ reading: Bool) {
        guard reading != isReading, !isClosed else { return }
        isReading = reading
        if reading { readSource.resume() } else { readSource.suspend() }
    }

    /// Resumes or suspends the write source, keeping suspend and resume balanced.
    func setWriting(_ writing: Bool) {
        guard writing != isWriting, !isClosed else { return }
        isWriting = writing
        if writing { writeSource.resume() } else { writeSource.suspend() }
    }

    /// Cancels both sources; the fd is closed once both cancel handlers have run.
    ///
    /// - Parameter reset: send RST rather than FIN (SO_LINGER with a zero timeout).
    func close(reset: Bool = false) {
        guard !isClosed else { return }
        if reset { socket.setResetOnClose() }
        isClosed = true
        // A suspended (or never activated) source must be resumed before cancel, or its cancel
        // handler never runs and the fd leaks. The event handlers check `isClosed`.
        if !isReading { readSource.resume() }
        if !isWriting { writeSource.resume() }
        readSource.cancel()
        writeSource.cancel()
    }
}
