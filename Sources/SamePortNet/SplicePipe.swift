import CSamePortShims
import Glibc

/// The kernel pipe through which one direction of a connection splices its bytes.
///
/// splice(2) moves pages between a socket and a pipe without copying them through user space, so
/// a relay moves socket → pipe → socket. The pipe is the direction's buffer: its size bounds what
/// the direction holds, as the read/write path's buffer does.
///
/// Sizing: F_SETPIPE_SZ asks for `size` bytes. An unprivileged process cannot go above
/// /proc/sys/fs/pipe-max-size, nor grow pipes once the user's pipes hold more than
/// /proc/sys/fs/pipe-user-pages-soft (fcntl fails with EPERM); a pipe then keeps the size it has.
/// A smaller pipe only means more splice calls, never a failed connection. Past the soft limit
/// the kernel also makes new pipes of 2 pages: `isWorthSplicing` says when to copy instead.
///
/// Like `Socket`, a plain value: the owning `Direction` closes it, on its connection's queue. No
/// Dispatch source ever watches a pipe (both ends are non-blocking and used only from the pump),
/// so closing it needs no cancel handler.
struct SplicePipe {
    let readEnd: Int32
    let writeEnd: Int32
    /// The pipe's size in bytes, as the kernel granted it.
    let capacity: Int

    /// Below this, a pipe the kernel shrank is not worth splicing through. Measured on loopback
    /// (scripts/throughput.py): a 2-page pipe moves 1 GB/s at 1.05 CPU-s/GiB where read/write with
    /// a 128 KiB buffer moves 2.1 GB/s at 0.4 CPU-s/GiB; a 16-page pipe (64 KiB, the kernel's
    /// default) is on a par with read/write.
    static let smallestWorthSplicing = 64 * 1024

    /// Whether to splice through this pipe, for a pipe of `asked` bytes: not when the kernel
    /// granted less than asked and less than `smallestWorthSplicing`. A small size the user asked
    /// for is kept.
    func isWorthSplicing(asked: Int) -> Bool {
        capacity >= min(asked, Self.smallestWorthSplicing)
    }

    /// pipe2(2) with O_NONBLOCK|O_CLOEXEC, then F_SETPIPE_SZ. Throws only when pipe2 fails (EMFILE,
    /// ENFILE: the caller copies instead); a size the kernel refuses is not an error.
    init(size: Int) throws(SystemError) {
        var fds: (Int32, Int32) = (-1, -1)
        _ = try withUnsafeMutableBytes(of: &fds) { raw throws(SystemError) in
            let pointer = raw.baseAddress?.assumingMemoryBound(to: Int32.self)
            return try systemCall("pipe2") { sameport_pipe2(pointer, O_NONBLOCK | O_CLOEXEC) }
        }
        let (readEnd, writeEnd) = fds
        self.readEnd = readEnd
        self.writeEnd = writeEnd
        let requested = Int32(clamping: size)
        if let granted = try? systemCall("fcntl(F_SETPIPE_SZ)", { sameport_set_pipe_size(writeEnd, requested) }) {
            capacity = Int(granted)
        } else if let current = try? systemCall("fcntl(F_GETPIPE_SZ)", { sameport_pipe_size(writeEnd) }), current > 0 {
            capacity = Int(current)
        } else {
            capacity = 16 * 4096  // the kernel's default pipe size
        }
    }

    /// splice(2) from `socket` into the pipe, at most `count` bytes. `.processed(0)` is EOF on the
    /// socket; `.wouldBlock` means the socket is empty or the pipe is full.
    func fill(from socket: Socket, count: Int) throws(SystemError) -> IOResult<Int> {
        try nonBlockingCall("splice") {
            sameport_splice(socket.fd, writeEnd, count, sameport_splice_move | sameport_splice_nonblock)
        }
    }

    /// splice(2) from the pipe to `socket`, at most `count` bytes. `.wouldBlock` means the socket's
    /// send buffer is full (or the pipe empty). A reset peer is EPIPE, never a SIGPIPE: the process
    /// ignores SIGPIPE (splice has no MSG_NOSIGNAL). `more`: SPLICE_F_MORE, which is MSG_MORE for
    /// the socket (see `Socket.write`).
    func drain(to socket: Socket, count: Int, more: Bool = false) throws(SystemError) -> IOResult<Int> {
        let flags = sameport_splice_move | sameport_splice_nonblock | (more ? sameport_splice_more : 0)
        return try nonBlockingCall("splice") { sameport_splice(readEnd, socket.fd, count, flags) }
    }

    /// read(2) from the pipe: how bytes already spliced in are taken back out when splicing them
    /// on is refused.
    func read(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> IOResult<Int> {
        try nonBlockingCall("read") { Glibc.read(readEnd, buffer.baseAddress, buffer.count) }
    }

    /// Closes both ends.
    func close() {
        _ = Glibc.close(readEnd)
        _ = Glibc.close(writeEnd)
    }
}
