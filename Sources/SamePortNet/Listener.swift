import Dispatch
import CSamePortShims
import Glibc
import SamePortCore
import Synchronization

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

/// A listening socket, served by every shard of the process.
///
/// The socket is registered in each shard's epoll set, level-triggered with EPOLLEXCLUSIVE: the
/// kernel wakes one shard per incoming client, and that shard accepts one client per event (the
/// next epoll_wait reports the listener again while more wait) and keeps the connections it
/// accepted. A shard stops accepting by deleting its
/// registration (at the connection limit, or pausing after EMFILE) and adds it back to resume; the
/// kernel's backlog holds clients meanwhile.
///
/// Concurrency: `setAccepting` and `close` may be called from any thread; each shard's part runs on
/// that shard.
final class Listener: @unchecked Sendable {  // immutable but for `acceptors`, set once before use
    /// The address the socket is bound to.
    let endpoint: Endpoint
    private let socket: Socket
    private var acceptors: [Acceptor] = []
    private let isClosed = Atomic<Bool>(false)
    /// Whether the relay wants clients now: set under the relay's lock, read by each shard when it
    /// updates its registration, so that a stale task can never leave a shard switched off.
    fileprivate let wantsAccepting = AcceptSwitch()

    private static let backlog: Int32 = 4096

    /// Binds and listens on `endpoint` with SO_REUSEADDR and SO_REUSEPORT.
    ///
    /// SO_REUSEPORT would let a second process bind the same port and silently share clients, so
    /// an exclusive probe (SO_REUSEADDR only) runs first and refuses a port someone else holds.
    ///
    /// - Parameter exclusive: false skips that probe, for a reload that moves a relay onto an
    ///   address another of this process's relays still holds.
    /// - Parameter transparent: IP_TRANSPARENT, so that TPROXY can deliver connections to any
    ///   address (`transparent = true`).
    static func open(_ endpoint: Endpoint, dualStack: Bool, exclusive: Bool = true, transparent: Bool = false) throws(StartupError) -> Listener {
        do {
            return try bind(endpoint, dualStack: dualStack, exclusive: exclusive, transparent: transparent)
        } catch {
            throw StartupError("cannot listen on \(endpoint): \(error.errno)\(hint(for: error.errno, endpoint: endpoint))", errno: error.errno)
        }
    }

    /// Listens on every local address: one dual-stack [::]:port socket, or 0.0.0.0:port on a
    /// host without IPv6.
    static func openWildcard(port: UInt16, exclusive: Bool = true, transparent: Bool = false) throws(StartupError) -> Listener {
        do {
            return try bind(Endpoint(.anyV6, port), dualStack: true, exclusive: exclusive, transparent: transparent)
        } catch where error.errno == .addressFamilyNotSupported {
            return try open(Endpoint(.anyV4, port), dualStack: false, exclusive: exclusive, transparent: transparent)
        } catch {
            throw StartupError("cannot listen on *:\(port): \(error.errno)\(hint(for: error.errno, endpoint: Endpoint(.anyV6, port)))", errno: error.errno)
        }
    }

    private static func bind(_ endpoint: Endpoint, dualStack: Bool, exclusive: Bool, transparent: Bool) throws(SystemError) -> Listener {
        if exclusive {
            let probe = try makeSocket(endpoint, dualStack: dualStack, reusePort: false)
            probe.close()
        }
        let socket = try makeSocket(endpoint, dualStack: dualStack, reusePort: true)
        do throws(SystemError) {
            if transparent { try socket.setTransparent(ipv6: endpoint.address.isIPv6) }
            socket.setNoDelayForClients()
            try socket.listen(backlog: backlog)
            return Listener(socket: socket, endpoint: try socket.localEndpoint())
        } catch {
            socket.close()
            throw error
        }
    }

    /// Takes over a listening socket that systemd passed: made non-blocking (systemd passes
    /// blocking sockets unless NonBlocking=yes) and close-on-exec. The socket is shared with
    /// PID 1, which keeps it open: it is closed when the relay stops, never shut down.
    static func adopt(fd: Int32, label: String) throws(StartupError) -> Listener {
        let socket = Socket(fd: fd)
        do {
            _ = try systemCall("fcntl") { sameport_set_nonblocking_cloexec(fd) }
            socket.setNoDelayForClients()
            return Listener(socket: socket, endpoint: try socket.localEndpoint())
        } catch {
            throw StartupError("cannot use \(label) from systemd: \(error)", errno: error.errno)
        }
    }

    /// The listening socket, for the checks made on a socket systemd passed.
    var listeningSocket: Socket { socket }

    /// Sets IP_TRANSPARENT on a socket systemd passed (`transparent = true`; systemd's own
    /// Transparent=yes does the same).
    func makeTransparent() throws(StartupError) {
        let ipv6 = endpoint.address.isIPv6
        // Already set (Transparent=yes): setting it again would need CAP_NET_ADMIN for nothing.
        let current = ipv6
            ? try? socket.option(level: Int32(IPPROTO_IPV6), name: IPV6_TRANSPARENT)
            : try? socket.option(level: Int32(IPPROTO_IP), name: IP_TRANSPARENT)
        if current == 1 { return }
        do {
            try socket.setTransparent(ipv6: ipv6)
        } catch {
            throw StartupError("cannot make \(endpoint) transparent: \(error): \(EgressBinding.hint(for: error.errno) ?? "check transparent = true")", errno: error.errno)
        }
    }

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
            return ": another socket holds port \(endpoint.port) (a listener, or a connection using it as its local port: ss -tanp 'sport = :\(endpoint.port)' shows which); stop its process or choose another listen port"
        case .permissionDenied:
            return ": ports below 1024 need root or CAP_NET_BIND_SERVICE (for the egress sockets too); grant it (setcap cap_net_bind_service=+ep, or AmbientCapabilities= under systemd) or listen on a port from 1024 up"
        case .addressNotAvailable:
            return ": \(endpoint.address) is not an address of this host; listen on one of its addresses or on *:\(endpoint.port)"
        case .addressFamilyNotSupported:
            return ": this host has no \(endpoint.address.familyName) support"
        case .notPermitted:
            return ": transparent = true (IP_TRANSPARENT) needs CAP_NET_ADMIN or CAP_NET_RAW: run sameport as root, or grant AmbientCapabilities=CAP_NET_ADMIN"
        default:
            return ""
        }
    }

    private init(socket: Socket, endpoint: Endpoint) {
        self.socket = socket
        self.endpoint = endpoint
    }

    /// Starts serving the socket on every shard of `group`: `acceptNext` accepts one client from
    /// the socket on the shard that calls it (false: none is waiting) and owns it from then. `onFatalError` hears of a socket that no longer
    /// accepts; `onTemporaryFailure` of a pause (out of descriptors or memory).
    func serve(
        on group: EventLoopGroup, acceptNext: @escaping AcceptNext,
        onFatalError: @escaping @Sendable (SystemError) -> Void,
        onTemporaryFailure: @escaping @Sendable (SystemError) -> Void
    ) {
        guard acceptors.isEmpty else { return }
        acceptors = group.loops.map {
            Acceptor(
                wantsAccepting: wantsAccepting, group: group, socket: socket, loop: $0, acceptNext: acceptNext,
                onFatalError: onFatalError, onTemporaryFailure: onTemporaryFailure)
        }
    }

    /// Starts or stops taking clients off the accept queue (the kernel keeps queueing them).
    func setAccepting(_ accepting: Bool) {
        wantsAccepting.isOn.store(accepting, ordering: .releasing)
        for acceptor in acceptors {
            acceptor.loop.execute { acceptor.updateRegistration() }
        }
    }

    /// Stops accepting for good; the socket is closed once every shard has let go of it.
    func close() {
        guard !isClosed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        guard !acceptors.isEmpty else { return socket.close() }
        let remaining = Atomic<Int>(acceptors.count)
        let socket = self.socket
        let countDown: @Sendable () -> Void = {
            if remaining.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 { socket.close() }
        }
        for acceptor in acceptors {
            acceptor.loop.execute {
                acceptor.close()
                countDown()
            }
        }
    }
}

/// Whether a listener's relay wants clients, shared by its shards' acceptors (which may outlive
/// the listener object by a task).
final class AcceptSwitch: Sendable {
    let isOn = Atomic<Bool>(false)
}

/// Accepts one client from the listening socket on the given shard; false when none is waiting.
typealias AcceptNext = @Sendable (Socket, EventLoop) throws(SystemError) -> Bool

/// One shard's part of a listener: its registration, and the accepting. Confined to its shard,
/// its state skips the runtime exclusivity check (see `Connection`).
private final class Acceptor: EventHandler, DeadlineHandler, @unchecked Sendable {  // confined to `loop`
    let loop: EventLoop
    private let wantsAccepting: AcceptSwitch
    private let group: EventLoopGroup
    /// The group's first shard accepts always; the others while the group spreads accepting.
    private let isFirst: Bool
    @exclusivity(unchecked) private var isWatchingSpread = false
    /// On the first shard: when an accept last found clients queued behind the one it took.
    @exclusivity(unchecked) private var lastBacklog: UInt64 = 0
    private let socket: Socket
    private let acceptNext: AcceptNext
    private let onFatalError: @Sendable (SystemError) -> Void
    private let onTemporaryFailure: @Sendable (SystemError) -> Void
    @exclusivity(unchecked) private var registration: UInt64?
    @exclusivity(unchecked) private var isBackingOff = false
    @exclusivity(unchecked) private var isClosed = false
    @exclusivity(unchecked) var deadlineIndex = -1
    @exclusivity(unchecked) var deadline: UInt64 = 0

    /// The other shards stop accepting once the first has kept up this long.
    private static let spreadHold: UInt64 = 1_000_000_000

    init(
        wantsAccepting: AcceptSwitch, group: EventLoopGroup, socket: Socket, loop: EventLoop, acceptNext: @escaping AcceptNext,
        onFatalError: @escaping @Sendable (SystemError) -> Void,
        onTemporaryFailure: @escaping @Sendable (SystemError) -> Void
    ) {
        self.wantsAccepting = wantsAccepting
        self.group = group
        self.isFirst = group.loops.first === loop
        self.socket = socket
        self.loop = loop
        self.acceptNext = acceptNext
        self.onFatalError = onFatalError
        self.onTemporaryFailure = onTemporaryFailure
    }

    func close() {
        isClosed = true
        loop.cancelDeadline(self)
        loop.unwatchAcceptSpread(self)
        updateRegistration()
    }

    func updateRegistration() {
        if !isFirst, !isWatchingSpread, !isClosed {
            isWatchingSpread = true
            loop.watchAcceptSpread(self) { [unowned self] in updateRegistration() }
        }
        let registered = wantsAccepting.isOn.load(ordering: .acquiring) && !isBackingOff && !isClosed
            && (isFirst || group.acceptSpread.load(ordering: .acquiring))
        if registered, registration == nil {
            do {
                registration = try loop.register(
                    fd: socket.fd, events: sameport_epollin | sameport_epollexclusive, handler: self, tag: 0)
            } catch {
                onFatalError(error)
            }
        } else if !registered, let registration {
            loop.deregister(fd: socket.fd, id: registration)
            self.registration = nil
        }
    }

    /// One client per event, as nginx takes them: the registration is level-triggered, so a
    /// listener with more clients waiting is reported again by the shard's next epoll_wait, which
    /// the shard calls anyway, and the accept4 that would only return EAGAIN is saved (one system
    /// call per connection when clients come one at a time). On the first shard the wait after an
    /// accept is a non-blocking look, and a listener it reports had clients queueing behind the
    /// one taken: that brings the other shards in. (The look is rarely wasted: a loopback
    /// upstream's connect has completed by then, and it reports that too.)
    func handle(events: UInt32, tag: UInt8) {
        guard registration != nil else { return }
        do {
            guard try acceptNext(socket, loop) else {
                updateRegistration()  // none waiting, or the relay is full or stopping
                return
            }
            if isFirst {
                // A look is asked for only right after an accept: a client it found was waiting.
                noteLoad(backlog: loop.lastWaitWasLook)
                loop.lookNext()
            }
        } catch {
            switch error.errno {
            case .badDescriptor, .invalidArgument, .notASocket, .badAddress:
                isClosed = true
                updateRegistration()
                onFatalError(error)  // the listening socket itself is broken
            case .connectionAborted, .protocolError, .protocolNotAvailable, .hostDown, .noNetwork,
                 .hostUnreachable, .operationNotSupported, .networkUnreachable, .networkDown, .timedOut:
                // accept(2): a pending network error of that one connection; the next client, if
                // any, is reported by the next wait.
                break
            default:
                // Out of descriptors or memory, or refused by a security module (EPERM, EACCES,
                // which recur on every retry): pause instead of spinning on a readable socket.
                isBackingOff = true
                updateRegistration()
                loop.setDeadline(self, at: Monotonic.now &+ 100_000_000)
                onTemporaryFailure(error)
            }
        }
    }

    func deadlineReached(now: UInt64) {
        isBackingOff = false
        updateRegistration()
    }

    /// On the first shard, after each accept: clients that queued behind the one taken (the
    /// listener reported again by the non-blocking look right after) bring the other shards in; a
    /// second of single arrivals lets them go.
    private func noteLoad(backlog: Bool) {
        guard group.loops.count > 1 else { return }
        let now = Monotonic.now
        if backlog {
            lastBacklog = now
            if !group.acceptSpread.load(ordering: .relaxed) { group.setAcceptSpread(true) }
        } else if now &- lastBacklog > Self.spreadHold, group.acceptSpread.load(ordering: .relaxed) {
            group.setAcceptSpread(false)
        }
    }
}

extension Socket {
    /// Options on a listening socket that Linux copies to every socket accepted from it, which
    /// saves a setsockopt per client: TCP_NODELAY (a relay forwards what it reads at once; Nagle
    /// only delays) and SO_OOBINLINE (see `setUrgentDataInline`). A failure is ignored: it costs
    /// that latency, or the urgent byte's place in the stream.
    func setNoDelayForClients() {
        try? setOption(level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1)
        setUrgentDataInline()
    }

    /// SO_OOBINLINE: a byte the peer sends as urgent (MSG_OOB: telnet's interrupt, FTP's abort)
    /// stays in the stream, where the relay passes it on like any other, instead of being held
    /// aside where no read of the stream would find it.
    func setUrgentDataInline() {
        try? setOption(level: SOL_SOCKET, name: SO_OOBINLINE, value: 1)
    }
}
