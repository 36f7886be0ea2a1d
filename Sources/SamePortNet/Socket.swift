import CSamePortShims
import Glibc
import SamePortCore

/// A TCP socket file descriptor and the calls the relay makes on it.
///
/// A `Socket` is a plain value: it does not close itself. Ownership is by convention and kept in one
/// place each: the `Listener` owns the listening socket, a `Connection` owns its two connected
/// ones and closes each right after deleting it from its shard's epoll set.
public struct Socket: Hashable, Sendable {
    /// The file descriptor.
    public let fd: Int32

    public init(fd: Int32) {
        self.fd = fd
    }

    /// socket(2): a non-blocking, close-on-exec TCP socket of the endpoint's family.
    public static func tcp(ipv6: Bool) throws(SystemError) -> Socket {
        let type = Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue)
        let fd = try systemCall("socket") { Glibc.socket(ipv6 ? AF_INET6 : AF_INET, type, 0) }
        return Socket(fd: fd)
    }

    /// setsockopt(2) with an `Int32` value.
    public func setOption(level: Int32, name: Int32, value: Int32, callName: String = "setsockopt") throws(SystemError) {
        var value = value
        _ = try systemCall(callName) {
            setsockopt(fd, level, name, &value, socklen_t(MemoryLayout<Int32>.size))
        }
    }

    /// getsockopt(2) for an `Int32` value.
    public func option(level: Int32, name: Int32) throws(SystemError) -> Int32 {
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        _ = try systemCall("getsockopt") { getsockopt(fd, level, name, &value, &length) }
        return value
    }

    /// Sets SO_REUSEADDR and SO_REUSEPORT, as two separate calls.
    ///
    /// Both are needed on the listener and on every egress socket for the egress to bind the
    /// listener's ip:P (socket(7)); `SO_REUSEADDR | SO_REUSEPORT` as one option name is a bug.
    public func setReuseAddressAndPort() throws(SystemError) {
        try setOption(level: SOL_SOCKET, name: SO_REUSEADDR, value: 1, callName: "setsockopt(SO_REUSEADDR)")
        try setOption(level: SOL_SOCKET, name: SO_REUSEPORT, value: 1, callName: "setsockopt(SO_REUSEPORT)")
    }

    /// bind(2).
    public func bind(to endpoint: Endpoint) throws(SystemError) {
        let address = SocketAddress(endpoint)
        _ = try systemCall("bind") { address.withSockAddr { Glibc.bind(fd, $0, $1) } }
    }

    /// listen(2).
    public func listen(backlog: Int32) throws(SystemError) {
        _ = try systemCall("listen") { Glibc.listen(fd, backlog) }
    }

    /// connect(2) on a non-blocking socket: true when connected at once, false when in progress.
    public func connect(to endpoint: Endpoint) throws(SystemError) -> Bool {
        let address = SocketAddress(endpoint)
        do {
            _ = try systemCall("connect") { address.withSockAddr { Glibc.connect(fd, $0, $1) } }
            return true
        } catch where error.errno == .inProgress {
            return false
        }
    }

    /// accept4(2) with SOCK_NONBLOCK|SOCK_CLOEXEC: the client and its address (which accept4
    /// gives for free, saving a getpeername), or nil when no client is waiting.
    public func accept() throws(SystemError) -> (socket: Socket, peer: Endpoint?)? {
        let flags = Int32(SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue)
        var peer = SocketAddress()
        let result = try nonBlockingCall("accept4") {
            peer.withMutableSockAddr { address, length in sameport_accept4(fd, address, length, flags) }
        }
        switch result {
        case .processed(let client): return (Socket(fd: client), peer.endpoint)
        case .wouldBlock: return nil
        }
    }

    /// getsockname(2): the local endpoint.
    public func localEndpoint() throws(SystemError) -> Endpoint {
        try endpoint(call: "getsockname") { getsockname(fd, $0, $1) }
    }

    /// getpeername(2): the remote endpoint.
    public func peerEndpoint() throws(SystemError) -> Endpoint {
        try endpoint(call: "getpeername") { getpeername(fd, $0, $1) }
    }

    private func endpoint(
        call: String, _ body: (UnsafeMutablePointer<sockaddr>, UnsafeMutablePointer<socklen_t>) -> Int32
    ) throws(SystemError) -> Endpoint {
        var address = SocketAddress()
        _ = try systemCall(call) { address.withMutableSockAddr(body) }
        guard let endpoint = address.endpoint else { throw SystemError(call, .addressFamilyNotSupported) }
        return endpoint
    }

    /// The pending error of a socket (SO_ERROR), nil if none: how a non-blocking connect ended.
    public func pendingError() -> Errno? {
        guard let value = try? option(level: SOL_SOCKET, name: SO_ERROR) else { return nil }
        return value == 0 ? nil : Errno(rawValue: value)
    }

    /// recv(2) into `buffer` (read(2) without the file layer's hooks); `.processed(0)` is EOF.
    func read(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> IOResult<Int> {
        try nonBlockingCall("recv") { Glibc.recv(fd, buffer.baseAddress, buffer.count, 0) }
    }

    /// send(2) with MSG_NOSIGNAL, so a reset peer is an EPIPE error and never a SIGPIPE. `more`:
    /// with MSG_MORE, which holds a last partial segment until the next send, shutdown(2) or
    /// close(2) (whose FIN then rides in it), or `push`.
    func write(from buffer: UnsafeRawBufferPointer, more: Bool = false) throws(SystemError) -> IOResult<Int> {
        let flags = Int32(MSG_NOSIGNAL) | (more ? Int32(MSG_MORE) : 0)
        return try nonBlockingCall("send") { Glibc.send(fd, buffer.baseAddress, buffer.count, flags) }
    }

    /// Sends what a write with MSG_MORE holds back: setting TCP_NODELAY (already on) pushes the
    /// pending segments (tcp(7)).
    func push() {
        try? setOption(level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1)
    }

    /// The bytes still in the socket's send queue (SIOCOUTQ), or -1 if the kernel will not say.
    func unsentBytes() -> Int {
        Int(sameport_unsent_bytes(fd))
    }

    /// The bytes waiting to be read (SIOCINQ), or -1 if the kernel will not say.
    func unreadBytes() -> Int {
        Int(sameport_unread_bytes(fd))
    }

    /// True when the peer has reset the connection: poll(2) reports an error or a hang-up, which
    /// on a socket this side has not shut down means the connection is closed (tcp_poll). Not a
    /// peek with recv(2): that returns bytes the peer sent before its RST, and only then the
    /// ECONNRESET. A clean EOF is not a reset: a client may half-close and still await a reply.
    func peerHasReset() -> Bool {
        var entry = pollfd(fd: fd, events: 0, revents: 0)
        guard Glibc.poll(&entry, 1, 0) == 1 else { return false }
        return entry.revents & Int16(POLLERR | POLLHUP) != 0
    }

    /// shutdown(2) with SHUT_WR: sends FIN after the queued bytes. Errors are ignored: the peer
    /// may already be gone, and the connection's end is decided by the reads.
    func shutdownWrite() {
        _ = Glibc.shutdown(fd, Int32(SHUT_WR))
    }

    /// SO_LINGER with a zero timeout: the next close() sends RST instead of FIN.
    func setResetOnClose() {
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
    }

    /// The socket's owner (fstat(2) of its inode): the user that created it, or the one it was
    /// fchown'd to. nil if fstat fails.
    public func owner() -> (uid: uid_t, gid: gid_t)? {
        var info = stat()
        guard fstat(fd, &info) == 0 else { return nil }
        return (info.st_uid, info.st_gid)
    }

    /// fchown(2): makes the socket this user's, which SO_REUSEPORT sharing needs (needs CAP_CHOWN).
    public func changeOwner(uid: uid_t, gid: gid_t) throws(SystemError) {
        _ = try systemCall("fchown") { fchown(fd, uid, gid) }
    }

    /// close(2). Not retried on EINTR: on Linux the descriptor is released even then.
    public func close() {
        _ = Glibc.close(fd)
    }
}
