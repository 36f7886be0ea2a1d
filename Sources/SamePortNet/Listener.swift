import Dispatch
import CSamePortShims
import Glibc
import SamePortCore

/// A start-up failure: one line that names the cause and the fix.
public struct StartupError: Error, Equatable, Sendable, CustomStringConvertible {
    public var message: String
    /// True when trying again later may succeed (a resolver that does not answer yet): a runtime
    /// failure rather than a configuration error.
    public var isTemporary: Bool
    /// The system error behind the failure, when there is one (ERRNO= for systemd).
    public var errno: Int32?

    public init(_ message: String, isTemporary: Bool = false, errno: Errno? = nil) {
        self.message = message
        self.isTemporary = isTemporary
        self.errno = errno?.rawValue
    }

    public var description: String { message }
}

/// A listening socket and the Dispatch read source that accepts its clients.
///
/// Concurrency: confined to the relay's queue, where the source delivers.
final class Listener: @unchecked Sendable {  // confined to `queue`
    /// The address the socket is bound to.
    let endpoint: Endpoint
    /// Called on `queue` for each accepted client; the callee owns the socket.
    var onAccept: ((Socket, Endpoint?) -> Void)?
    /// Called on `queue` when accept fails in a way that retrying cannot cure.
    var onFatalError: ((SystemError) -> Void)?
    /// Called on `queue` when accepting pauses for lack of descriptors or memory.
    var onTemporaryFailure: ((SystemError) -> Void)?

    private let socket: Socket
    private let queue: DispatchQueue
    private let source: DispatchSourceRead
    private var isSourceResumed = false
    private var wantsAccepting = false
    private var isBackingOff = false
    private var isClosed = false

    private static let backlog: Int32 = 4096

    /// Binds and listens on `endpoint` with SO_REUSEADDR and SO_REUSEPORT.
    ///
    /// SO_REUSEPORT would let a second process bind the same port and silently share clients, so
    /// an exclusive probe (SO_REUSEADDR only) runs first and refuses a port someone else holds.
    ///
    /// - Parameter exclusive: false skips that probe, for a reload that moves a relay onto an
    ///   address another of this process's relays still holds.
    static func open(_ endpoint: Endpoint, dualStack: Bool, exclusive: Bool = true, queue: DispatchQueue) throws(StartupError) -> Listener {
        do {
            return try bind(endpoint, dualStack: dualStack, exclusive: exclusive, queue: queue)
        } catch {
            throw StartupError("cannot listen on \(endpoint): \(error.errno)\(hint(for: error.errno, endpoint: endpoint))", errno: error.errno)
        }
    }

    /// Listens on every local address: one dual-stack [::]:port socket, or 0.0.0.0:port on a
    /// host without IPv6.
    static func openWildcard(port: UInt16, exclusive: Bool = true, queue: DispatchQueue) throws(StartupError) -> Listener {
        do {
            return try bind(Endpoint(.anyV6, port), dualStack: true, exclusive: exclusive, queue: queue)
        } catch where error.errno == .addressFamilyNotSupported {
            return try open(Endpoint(.anyV4, port), dualStack: false, exclusive: exclusive, queue: queue)
        } catch {
            throw StartupError("cannot listen on *:\(port): \(error.errno)\(hint(for: error.errno, endpoint: Endpoint(.anyV6, port)))", errno: error.errno)
        }
    }

    private static func bind(_ endpoint: Endpoint, dualStack: Bool, exclusive: Bool, queue: DispatchQueue) throws(SystemError) -> Listener {
        if exclusive {
            let probe = try makeSocket(endpoint, dualStack: dualStack, reusePort: false)
            probe.close()
        }
        let socket = try makeSocket(endpoint, dualStack: dualStack, reusePort: true)
        do throws(SystemError) {
            try socket.listen(backlog: backlog)
            return Listener(socket: socket, endpoint: try socket.localEndpoint(), queue: queue)
        } catch {
            socket.close()
            throw error
        }
    }

    /// Takes over a listening socket that systemd passed: made non-blocking (systemd passes
    /// blocking sockets unless NonBlocking=yes) and close-on-exec. The socket is shared with
    /// PID 1, which keeps it open: it is closed when the relay stops, never shut down.
    static func adopt(fd: Int32, label: String, queue: DispatchQueue) throws(StartupError) -> Listener {
        let socket = Socket(fd: fd)
        do {
            _ = try systemCall("fcntl") { sameport_set_nonblocking_cloexec(fd) }
            return Listener(socket: socket, endpoint: try socket.localEndpoint(), queue: queue)
        } catch {
            throw StartupError("cannot use \(label) from systemd: \(error)", errno: error.errno)
        }
    }

    /// The listening socket, for the checks made on a socket systemd passed.
    var listeningSocket: Socket { socket }

    private static func makeSocket(_ endpoint: Endpoint, dualStack: Bool, reusePort: Bool) throws(SystemError) -> Socket {
        let socket = try Socket.tcp(ipv6: endpoint.address.isIPv6)
        do {
            if reusePort {
                try socket.setReuseAddressAndPort()
            } else {
                try socket.setOption(level: SOL_SOCKET, name: SO_REUSEADDR, value: 1)
            }
            if endpoint.address.isIPv6 {
                try socket.setOption(level: Int32(IPPROTO_IPV6), name: IPV6_V6ONLY, value: dualStack ? 0 : 1)
            }
            try socket.bind(to: endpoint)
            return socket
        } catch {
            socket.close()
            throw error
        }
    }

    static func hint(for errno: Errno, endpoint: Endpoint) -> String {
        switch errno {
        case .addressInUse:
            return ": another process is listening on port \(endpoint.port); stop it or choose another listen port"
        case .permissionDenied:
            return ": ports below 1024 need root or CAP_NET_BIND_SERVICE (for the egress sockets too); grant it (setcap cap_net_bind_service=+ep, or AmbientCapabilities= under systemd) or listen on a port from 1024 up"
        case .addressNotAvailable:
            return ": \(endpoint.address) is not an address of this host; listen on one of its addresses or on *:\(endpoint.port)"
        case .addressFamilyNotSupported:
            return ": this host has no \(endpoint.address.familyName) support"
        default:
            return ""
        }
    }

    private init(socket: Socket, endpoint: Endpoint, queue: DispatchQueue) {
        self.socket = socket
        self.endpoint = endpoint
        self.queue = queue
        source = DispatchSource.makeReadSource(fileDescriptor: socket.fd, queue: queue)
        source.setEventHandler { [unowned self] in acceptAll() }
        source.setCancelHandler { [socket] in socket.closeWatched() }
    }

    /// Starts or stops taking clients off the accept queue (the kernel keeps queueing them).
    func setAccepting(_ accepting: Bool) {
        wantsAccepting = accepting
        updateSource()
    }

    /// Stops accepting for good and closes the socket once the source is cancelled.
    func close() {
        guard !isClosed else { return }
        isClosed = true
        if !isSourceResumed { source.resume() }
        source.cancel()
    }

    private func updateSource() {
        let resumed = wantsAccepting && !isBackingOff && !isClosed
        guard resumed != isSourceResumed, !isClosed else { return }
        isSourceResumed = resumed
        if resumed { source.resume() } else { source.suspend() }
    }

    private func acceptAll() {
        while wantsAccepting, !isBackingOff, !isClosed {
            do {
                guard let (client, peer) = try socket.accept() else { return }
                onAccept?(client, peer)
            } catch {
                switch error.errno {
                case .badDescriptor, .invalidArgument, .notASocket, .badAddress:
                    onFatalError?(error)  // the listening socket itself is broken
                    return
                case .connectionAborted, .protocolError, .protocolNotAvailable, .hostDown, .noNetwork,
                     .hostUnreachable, .operationNotSupported, .networkUnreachable, .networkDown, .timedOut:
                    continue  // accept(2): a pending network error of that one connection; serve the next
                default:
                    // Out of descriptors or memory, or refused by a security module (EPERM, EACCES,
                    // which recur on every retry): pause instead of spinning on a readable socket.
                    isBackingOff = true
                    updateSource()
                    queue.asyncAfter(deadline: .now() + .milliseconds(100)) { [self] in
                        isBackingOff = false
                        updateSource()
                    }
                    onTemporaryFailure?(error)
                    return
                }
            }
        }
    }
}
