import Dispatch
import Glibc

/// A connected socket with the one read source and one write source it keeps for its whole life.
///
/// Design note (libdispatch on Linux, see kernel-facts.md):
/// - Both sources are activated (registered with epoll) as soon as the channel exists, and stay
///   registered until `close`. libdispatch handles EPOLLHUP (a reset, or FIN both ways) by removing
///   the fd from epoll; a source registered after that fails to register without a word
///   (swift-corelibs-libdispatch #833) and never fires, so a reset that arrives before a lazily
///   activated source would be lost. Sources registered before the hang-up all receive it.
/// - Wanting events is separate from being registered: a source that fires while its side is not
///   wanted suspends itself, and `setReading`/`setWriting` resume and suspend it, balanced.
/// - Sources are one-shot epoll registrations re-armed after each handler; a handler that does not
///   drain the socket fires again at once, so back-pressure suspends the source instead.
/// - A suspended source's cancel handler runs only after `resume()`, and releasing a suspended
///   source crashes: `close` resumes first.
/// - The fd is closed only from the cancel handler of the last source to be cancelled: closing any
///   earlier races with the event loop ("Do not close random Unix descriptors"). Even then its
///   number is kept from the next socket for a while (`DescriptorGraveyard`).
///
/// Concurrency: every method is called on `queue`, and both sources deliver to it.
final class SocketChannel: @unchecked Sendable {  // confined to `queue`
    let socket: Socket
    let queue: DispatchQueue
    /// Called on `queue` when the socket is readable (or has EOF or an error pending), while wanted.
    var onReadable: (() -> Void)?
    /// Called on `queue` when the socket is writable (or a connect finished), while wanted.
    var onWritable: (() -> Void)?

    private let readSource: DispatchSourceRead
    private let writeSource: DispatchSourceWrite
    /// Whether the owner wants read or write events.
    private(set) var isReading = false
    private(set) var isWriting = false
    /// Whether each source is resumed (it is, right after activation).
    private var readResumed = true
    private var writeResumed = true
    private(set) var isClosed = false
    private var pendingCancels = 2

    init(socket: Socket, queue: DispatchQueue) {
        self.socket = socket
        self.queue = queue
        readSource = DispatchSource.makeReadSource(fileDescriptor: socket.fd, queue: queue)
        writeSource = DispatchSource.makeWriteSource(fileDescriptor: socket.fd, queue: queue)
        readSource.setEventHandler { [unowned self] in
            guard !isClosed else { return }
            if isReading { onReadable?() } else { suspendRead() }
        }
        writeSource.setEventHandler { [unowned self] in
            guard !isClosed else { return }
            if isWriting { onWritable?() } else { suspendWrite() }
        }
        // Both cancel handlers run on the serial `queue`; the second one to run closes the fd.
        // They hold the channel strongly, so it lives until the fd is closed.
        let finish: @Sendable () -> Void = { [self] in
            pendingCancels -= 1
            if pendingCancels == 0 {
                socket.closeWatched()
                onReadable = nil
                onWritable = nil
            }
        }
        readSource.setCancelHandler(handler: finish)
        writeSource.setCancelHandler(handler: finish)
        readSource.activate()
        writeSource.activate()
    }

    /// Asks for read events or stops them; the source stays registered either way.
    func setReading(_ reading: Bool) {
        guard !isClosed else { return }
        isReading = reading
        if reading, !readResumed {
            readResumed = true
            readSource.resume()
        } else if !reading {
            suspendRead()
        }
    }

    /// Asks for write events or stops them; the source stays registered either way.
    func setWriting(_ writing: Bool) {
        guard !isClosed else { return }
        isWriting = writing
        if writing, !writeResumed {
            writeResumed = true
            writeSource.resume()
        } else if !writing {
            suspendWrite()
        }
    }

    private func suspendRead() {
        guard readResumed else { return }
        readResumed = false
        readSource.suspend()
    }

    private func suspendWrite() {
        guard writeResumed else { return }
        writeResumed = false
        writeSource.suspend()
    }

    /// Cancels both sources; the fd is closed once both cancel handlers have run.
    ///
    /// - Parameter reset: send RST rather than FIN (SO_LINGER with a zero timeout).
    func close(reset: Bool = false) {
        guard !isClosed else { return }
        if reset { socket.setResetOnClose() }
        isClosed = true
        // A suspended source must be resumed before cancel, or its cancel handler never runs and
        // the fd leaks. The event handlers check `isClosed`.
        if !readResumed { readSource.resume() }
        if !writeResumed { writeSource.resume() }
        readResumed = true
        writeResumed = true
        readSource.cancel()
        writeSource.cancel()
    }
}
