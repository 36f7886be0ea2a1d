import Dispatch
import Glibc
import Logging
import SamePortCore

/// One relay: a listener, the bookkeeping of the 4-tuples in use, the clients waiting for one,
/// and the open connections.
///
/// Concurrency model: everything here runs on the relay's serial `queue` (accepts, bookkeeping,
/// waiters' timers); each connection runs on its own queue and reports its end back here.
public final class Relay: @unchecked Sendable {  // confined to `queue` after `start()`
    /// The relay's name: what a reload matches relays by, and a passed socket's name.
    public let name: String
    /// The spec new connections are made with; a reload may replace it (`reconfigure`).
    public private(set) var spec: RelaySpec
    /// The address the listener is bound to (with the real port, once started).
    public private(set) var listenEndpoint: Endpoint?
    /// True when the listener is a socket systemd passed (socket activation).
    public private(set) var isInherited = false
    /// The socket from systemd belonged to another user and was made this process's (CAP_CHOWN).
    public private(set) var tookOverSocket = false
    /// Called on `queue` with a message and its errno if the listener fails for good; the process
    /// should stop with exit 1.
    public var onFatalError: (@Sendable (String, Int32) -> Void)?

    private let queue: DispatchQueue
    private let workQueue: DispatchQueue
    private let logger: Logger
    private var selector: UpstreamSelector
    private var waiting: WaitQueue<Waiter>
    /// Open connections, with the upstream each has booked (none while it fails over) and the
    /// generation of the spec it started under.
    private var connections: [ObjectIdentifier: (connection: Connection, reservation: UpstreamSelector.Reservation?, generation: Int)] = [:]
    private var listener: Listener?
    private var isStopping = false
    private var stopCompletions: [@Sendable () -> Void] = []
    /// Bumped by each `reconfigure`: upstream indices of older connections mean another list.
    private var generation = 0
    /// Clients handed to a connection since start.
    private var served = 0

    /// A connection whose upstream failed, waiting for another one to free up.
    private struct Failover {
        var id: ObjectIdentifier
        var egress: Endpoint?
        var isIPv6: Bool
        var tried: Set<Int>
        var answer: @Sendable (Connection.Failover) -> Void
    }
    /// Connections failing over, served before queued clients: they were accepted earlier.
    private var failingOver: [Failover] = []

    /// How long an upstream that refused or timed out is passed over (nginx's fail_timeout).
    private static let downTime = Duration.seconds(10)

    /// A client that found every upstream in use and is waiting for one.
    private struct Waiter {
        var client: Socket
        var clientEndpoint: Endpoint
        var binding: EgressBinding
        var acceptedAt: DispatchTime
        /// Bounds the wait in the queue; created only for queued clients, because libdispatch
        /// crashes on releasing a source that was never activated.
        var timer: DispatchSourceTimer?
    }

    /// - Parameters:
    ///   - spec: a spec with no `problems()`.
    ///   - upstreams: the resolved addresses of each of `spec.upstreams`, in the same order.
    public init(spec: RelaySpec, upstreams: [[Endpoint]], logger: Logger) {
        self.name = spec.name
        self.spec = spec
        self.logger = logger
        queue = DispatchQueue(label: "sameport.relay.\(spec.name)")
        workQueue = DispatchQueue.global()
        selector = UpstreamSelector(upstreams: upstreams)
        waiting = WaitQueue(limit: spec.queueLimit)
    }

    /// A listening socket systemd passed, for `open(inherited:)`.
    public struct InheritedSocket: Sendable {
        public var fd: Int32
        /// The socket as messages name it: `socket 3 "proxy"`.
        public var label: String
        /// Makes CAP_CHOWN effective when the process may have it; false when it cannot.
        public var mayChangeOwner: @Sendable () -> Bool

        public init(fd: Int32, label: String, mayChangeOwner: @escaping @Sendable () -> Bool) {
            self.fd = fd
            self.label = label
            self.mayChangeOwner = mayChangeOwner
        }
    }

    /// Binds the listener (or takes over the one systemd passed) and proves that the egress can
    /// bind next to it; accepts no client yet, so that a daemon with several relays starts all of
    /// them or none (see `startAccepting()`).
    ///
    /// - Parameter sharedWithOwnRelay: the address is held by another relay of this process that a
    ///   reload is replacing: bind beside it (SO_REUSEPORT) instead of refusing a taken port.
    public func open(inherited: InheritedSocket? = nil, sharedWithOwnRelay: Bool = false) throws(StartupError) {
        DescriptorGraveyard.prepare()
        let listener: Listener
        if let inherited {
            listener = try Listener.adopt(fd: inherited.fd, label: inherited.label, queue: queue)
        } else {
            switch spec.listen.host {
            case .any:
                listener = try Listener.openWildcard(port: spec.listen.port, exclusive: !sharedWithOwnRelay, queue: queue)
            case .ip(let address):
                listener = try Listener.open(Endpoint(address, spec.listen.port), dualStack: false, exclusive: !sharedWithOwnRelay, queue: queue)
            case .name:
                throw StartupError("cannot listen on \(spec.listen): listen on an IP address or *:PORT")
            }
        }
        do {
            if let inherited {
                try prepareInherited(listener, inherited)
            } else {
                try probeEgress(listener.endpoint)
            }
            try checkFamilies(listener.endpoint)
        } catch {
            // A passed socket stays systemd's: it is closed here, never shut down.
            listener.close()
            throw error
        }
        listenEndpoint = listener.endpoint
        isInherited = inherited != nil
        self.listener = listener
    }

    /// The checks a socket from systemd gets before the relay is ready: it must be a listening
    /// socket (checked by the caller), share its port (SO_REUSEPORT, switched on if off), and let
    /// an egress socket bind its ip:P, which needs both sockets to have one owner.
    private func prepareInherited(_ listener: Listener, _ inherited: InheritedSocket) throws(StartupError) {
        let socket = listener.listeningSocket
        let endpoint = listener.endpoint
        let differs: Bool
        if let configured = spec.listen.endpoint {
            differs = configured.unmapped != endpoint.unmapped
        } else {
            differs = spec.listen.host == .any && (!endpoint.address.isUnspecified || endpoint.port != spec.listen.port)
        }
        if differs {
            logger.warning("listen is \(spec.listen) in the configuration, but \(inherited.label) from systemd is bound to \(endpoint): serving \(endpoint); make listen and ListenStream= agree", metadata: ["relay": .string(name)])
        }
        if (try? socket.option(level: SOL_SOCKET, name: SO_REUSEPORT)) == 0 {
            do {
                try socket.setOption(level: SOL_SOCKET, name: SO_REUSEPORT, value: 1, callName: "setsockopt(SO_REUSEPORT)")
            } catch {
                throw StartupError("\(inherited.label) from systemd has SO_REUSEPORT off, which the egress needs to bind \(endpoint), and switching it on failed (\(error.errno)): set ReusePort=yes in the .socket unit", errno: error.errno)
            }
            logger.warning("\(inherited.label) from systemd had SO_REUSEPORT off, which the egress needs to bind \(endpoint): switched it on; set ReusePort=yes in the .socket unit", metadata: ["relay": .string(name)])
        }
        // The kernel shares a port only between sockets of one owner (the uid that created them),
        // and PID 1 (root) created this one. Take it over whenever CAP_CHOWN allows, whatever the
        // egress is now, so that a reload may switch the egress to the same port later.
        let owner = socket.owner()
        var takeOverFailure: SystemError?
        if let owner, owner.uid != geteuid(), inherited.mayChangeOwner() {
            do {
                try socket.changeOwner(uid: geteuid(), gid: getegid())
                tookOverSocket = true
                logger.notice("took over \(inherited.label) from uid \(owner.uid) (CAP_CHOWN), so that the egress can bind \(endpoint)", metadata: ["relay": .string(name)])
            } catch {
                takeOverFailure = error
                logger.warning("could not take over \(inherited.label) from uid \(owner.uid): \(error); the egress can bind \(endpoint) only if it needs no shared port (ephemeral, or another address)", metadata: ["relay": .string(name)])
            }
        }
        do {
            try probeEgress(endpoint)
        } catch where error.errno == EADDRINUSE {
            // Owned by another user and not taken over: say so; otherwise the plain refusal.
            guard let owner, owner.uid != geteuid(), !tookOverSocket else { throw error }
            let binding = EgressBinding(mode: spec.egress, local: endpoint)
            let cause = "\(inherited.label) from systemd belongs to uid \(owner.uid), sameport runs as uid \(geteuid()), and the kernel shares a port (SO_REUSEPORT) only between sockets of one owner"
            let tried = takeOverFailure.map { ", and taking it over failed (\($0))" } ?? ""
            let cures = "run sameport as uid \(owner.uid), or grant it CAP_CHOWN (AmbientCapabilities=CAP_CHOWN) to take the socket over"
            throw StartupError("the egress cannot bind \(binding): \(cause)\(tried): \(cures)", errno: .addressInUse)
        }
    }

    /// Starts taking clients on the listener `open()` bound.
    public func startAccepting() {
        queue.sync {
            guard let listener else { return }
            listener.onAccept = { [unowned self] in accepted($0, peer: $1) }
            listener.onTemporaryFailure = { [unowned self] error in
                logger.warning("accept paused for 100ms", metadata: ["relay": .string(spec.name), "cause": .stringConvertible(error)])
            }
            // The endpoint, not the listener: the listener holds this closure.
            listener.onFatalError = { [unowned self, endpoint = listener.endpoint] error in
                let cure = error.errno == .invalidArgument
                    ? "the socket no longer listens (did a process sharing it shut it down?); restart sameport"
                    : "restart sameport"
                onFatalError?("relay \(spec.name): accept on \(endpoint) failed: \(error): \(cure)", error.errno.rawValue)
            }
            listener.setAccepting(true)
        }
    }

    /// Closes the listener of a relay that was opened but will not run (another relay failed).
    public func close() {
        queue.sync {
            listener?.close()
            listener = nil
        }
    }

    /// Binds an egress socket the way connections will, then closes it: a refusal here (another
    /// user owns the listener, SO_REUSEPORT off, a foreign egress IP) is a start-up error, not a
    /// failure on every client later.
    private func probeEgress(_ listenEndpoint: Endpoint, spec: RelaySpec? = nil) throws(StartupError) {
        let binding = EgressBinding(mode: (spec ?? self.spec).egress, local: listenEndpoint)
        do {
            try binding.makeSocket().close()
        } catch {
            let hint = EgressBinding.hint(for: error.errno) ?? "check --egress"
            throw StartupError("the egress cannot bind \(binding): \(error.errno): \(hint)", errno: error.errno)
        }
    }

    /// Refuses a relay whose egress can only be IPv4 (or IPv6) while no upstream has an address of
    /// that family: every client would fail. A wildcard listener can take either family.
    private func checkFamilies(_ listenEndpoint: Endpoint, spec: RelaySpec? = nil, upstreams: [[Endpoint]]? = nil) throws(StartupError) {
        let egressAddress = EgressBinding(mode: (spec ?? self.spec).egress, local: listenEndpoint).address
        guard !egressAddress.isUnspecified else { return }
        let family = egressAddress.familyName
        guard (upstreams ?? selector.upstreams).contains(where: { $0.contains { $0.address.isIPv6 == egressAddress.isIPv6 } }) else {
            throw StartupError("no upstream has an \(family) address to dial from \(egressAddress); give an \(family) upstream, or listen on an address of the upstreams' family")
        }
    }

    /// The start-up checks of `open()` for a spec a reload would apply to this running relay: its
    /// egress binds beside the listener, and some upstream has an address of its family.
    public func check(spec newSpec: RelaySpec, upstreams: [[Endpoint]]) throws(StartupError) {
        guard let listenEndpoint else { return }
        try probeEgress(listenEndpoint, spec: newSpec)
        try checkFamilies(listenEndpoint, spec: newSpec, upstreams: upstreams.map { $0.map(\.unmapped) })
    }

    /// Stops accepting and closes waiting clients at once; lets open connections finish for up
    /// to `timeout`, then ends those left (logged `end=shutdown`); then calls `completion`. A
    /// second call (a shorter timeout: a second signal) cuts sooner; both completions run.
    public func drain(timeout: Duration, completion: @escaping @Sendable () -> Void) {
        queue.async { [self] in
            isStopping = true
            stopCompletions.append(completion)
            listener?.close()
            listener = nil
            for waiter in waiting.removeAll() {
                endWaiter(waiter, .shutdown)
            }
            for failover in failingOver {
                failover.answer(.stopping)
            }
            failingOver.removeAll()
            if timeout <= .zero {
                cutConnections()
            } else if !connections.isEmpty {
                queue.asyncAfter(deadline: .now() + timeout.dispatchInterval) { [self] in cutConnections() }
            }
            finishStopIfDone()
        }
    }

    private func cutConnections() {
        for (connection, _, _) in connections.values {
            connection.stop()
        }
    }

    /// Live counts, for the service manager's status line.
    public struct Counts: Sendable, Equatable {
        public var open: Int
        public var queued: Int
        public var served: Int
    }

    public func counts() -> Counts {
        queue.sync { Counts(open: connections.count, queued: waiting.count, served: served) }
    }

    /// Runs `body` on the relay's queue: the watchdog's proof that the queue is not stuck.
    public func onQueue(_ body: @escaping @Sendable () -> Void) {
        queue.async(execute: body)
    }

    /// Applies a reloaded spec (same name, same listener) to new connections: open connections
    /// go on with the settings they started with, and keep their upstream booked.
    public func reconfigure(spec newSpec: RelaySpec, upstreams: [[Endpoint]]) {
        queue.sync {
            spec = newSpec
            generation += 1
            selector = UpstreamSelector(upstreams: upstreams)
            for entry in connections.values {
                if let reservation = entry.reservation { selector.adopt(reservation) }
            }
            waiting.limit = newSpec.queueLimit
            serveWaiters()
            updateAccepting()
        }
    }

    // MARK: Accepting

    private func accepted(_ client: Socket, peer acceptedPeer: Endpoint?) {
        let acceptedAt = DispatchTime.now()
        // The local address is the listener's, unless it listens on every address.
        let listenerEndpoint = listenEndpoint.flatMap { $0.address.isUnspecified ? nil : $0 }
        guard let local = listenerEndpoint ?? (try? client.localEndpoint()),
              let peer = acceptedPeer ?? (try? client.peerEndpoint()) else {
            client.close()  // reset before we looked at it
            ConnectionLog(
                relay: spec.name, client: "-", egress: "-", upstream: "-", bytesToUpstream: 0, bytesToClient: 0,
                duration: acceptedAt.elapsed, end: .clientReset
            ).log(to: logger)
            return
        }
        let binding = EgressBinding(mode: spec.egress, local: local)
        let waiter = Waiter(
            client: client, clientEndpoint: peer.unmapped, binding: binding, acceptedAt: acceptedAt)
        if let refusal = spec.access.refusal(of: waiter.clientEndpoint.address) {
            // A reset, not a FIN: the client learns at once, and no TIME_WAIT is left here.
            client.setResetOnClose()
            return endWaiter(waiter, .refused(cause: refusal))
        }
        logger.debug("accepted", metadata: ["relay": .string(spec.name), "client": .stringConvertible(waiter.clientEndpoint), "egress": .stringConvertible(binding)])
        if !serve(waiter) {
            switch spec.onBusy {
            case .reject:
                endWaiter(waiter, .busyRejected)
            case .ephemeral:
                logger.notice("every upstream is in use from \(binding): dialling from an ephemeral port", metadata: ["relay": .string(spec.name), "client": .stringConvertible(waiter.clientEndpoint)])
                var fallback = waiter
                fallback.binding = .ephemeral(binding.address)
                if !serve(fallback) { endWaiter(waiter, .connectFailed(cause: "no upstream address")) }
            case .queue:
                enqueue(waiter)
            }
        }
        updateAccepting()
    }

    /// Starts a connection for the waiter if an upstream is free for its egress.
    ///
    /// - Returns: false when every upstream is in use from that egress.
    private func serve(_ waiter: Waiter) -> Bool {
        let booked = waiter.binding.bookedEndpoint
        switch selector.reserve(egress: booked, isIPv6: waiter.binding.isIPv6, now: DispatchTime.now().uptimeNanoseconds) {
        case .busy:
            return false
        case .noAddressOfFamily:
            endWaiter(waiter, .connectFailed(cause: "no upstream has an \(waiter.binding.address.familyName) address to dial from \(waiter.binding)"))
            return true
        case .reserved(let reservation):
            waiter.timer?.cancel()
            let connection = Connection(
                client: waiter.client, clientEndpoint: waiter.clientEndpoint, acceptedAt: waiter.acceptedAt,
                binding: waiter.binding, reservation: reservation,
                settings: .init(
                    relayName: spec.name, connectTimeout: spec.connectTimeout, idleTimeout: spec.idleTimeout,
                    bufferSize: spec.bufferSize, pipeSize: spec.splice == .on ? spec.pipeSize : nil,
                    spliceAfter: UInt64(spec.spliceAfter), logger: logger),
                queue: DispatchQueue(label: "sameport.connection", target: workQueue))
            let id = ObjectIdentifier(connection)
            connections[id] = (connection, reservation, generation)
            served += 1
            connection.onEnd = { [unowned self] _ in
                queue.async { self.connectionEnded(id) }
            }
            let isIPv6 = waiter.binding.isIPv6
            connection.onUpstreamFailed = { [unowned self] tried, answer in
                queue.async { self.replaceUpstream(of: id, egress: booked, isIPv6: isIPv6, tried: tried, answer: answer) }
            }
            connection.start()
            return true
        }
    }

    private func enqueue(_ waiter: Waiter) {
        guard !waiting.isFull else { return endWaiter(waiter, .queueFull) }
        logger.debug("queued: every upstream is in use from this egress", metadata: [
            "relay": .string(spec.name), "client": .stringConvertible(waiter.clientEndpoint),
            "egress": .stringConvertible(waiter.binding), "waiting": .stringConvertible(waiting.count + 1)])
        var waiter = waiter
        let timer = DispatchSource.makeTimerSource(queue: queue)
        waiter.timer = timer
        guard let ticket = waiting.append(waiter) else { return }  // not full: checked above
        timer.setEventHandler { [unowned self] in
            if let waiter = waiting.remove(ticket: ticket) {
                endWaiter(waiter, .queueTimeout)
                updateAccepting()
            }
        }
        timer.schedule(deadline: .now() + spec.connectTimeout.dispatchInterval, leeway: .milliseconds(10))
        timer.activate()
    }

    private func endWaiter(_ waiter: Waiter, _ end: ConnectionEnd) {
        waiter.timer?.cancel()
        waiter.client.close()
        ConnectionLog(
            relay: spec.name, client: waiter.clientEndpoint.description, egress: waiter.binding.description,
            upstream: "-", bytesToUpstream: 0, bytesToClient: 0, duration: waiter.acceptedAt.elapsed, end: end
        ).log(to: logger)
    }

    /// Frees the upstream a connection could not reach, passes it over for a while, and hands the
    /// connection another upstream it has not tried: at once if one is free, later if one is busy.
    private func replaceUpstream(
        of id: ObjectIdentifier, egress: Endpoint?, isIPv6: Bool, tried: Set<Int>,
        answer: @escaping @Sendable (Connection.Failover) -> Void
    ) {
        guard let entry = connections[id] else { return answer(.noneLeft) }
        guard !isStopping else { return answer(.stopping) }
        // A connection from before a reload knows upstreams by the old list's indices: it gets
        // none of the new list (rare: it was still dialling when the reload landed).
        guard entry.generation == generation else {
            if let reservation = entry.reservation { selector.release(reservation) }
            connections[id] = (entry.connection, nil, entry.generation)
            return answer(.noneLeft)
        }
        if let reservation = entry.reservation {
            selector.release(reservation)
            selector.markDown(reservation.upstreamIndex, until: (DispatchTime.now() + Self.downTime.dispatchInterval).uptimeNanoseconds)
            if selector.upstreams.count > 1 {
                logger.warning("upstream \(spec.upstreams[reservation.upstreamIndex]) failed to connect: passed over for \(Self.downTime.shortDescription)", metadata: ["relay": .string(spec.name)])
            }
        }
        connections[id] = (entry.connection, nil, entry.generation)
        failingOver.append(Failover(id: id, egress: egress, isIPv6: isIPv6, tried: tried, answer: answer))
        serveWaiters()
        updateAccepting()
    }

    private func connectionEnded(_ id: ObjectIdentifier) {
        guard let entry = connections.removeValue(forKey: id) else { return }
        if let reservation = entry.reservation { selector.release(reservation) }
        serveWaiters()
        updateAccepting()
        finishStopIfDone()
    }

    /// Serves connections failing over, then queued clients, oldest first, while upstreams are
    /// free; drops queued clients that reset.
    private func serveWaiters() {
        let now = DispatchTime.now().uptimeNanoseconds
        failingOver.removeAll { failover in
            guard let entry = connections[failover.id] else { return true }  // ended meanwhile
            // Its `tried` holds the old list's indices: as in replaceUpstream, no new upstream.
            guard entry.generation == generation else {
                failover.answer(.noneLeft)
                return true
            }
            switch selector.reserve(egress: failover.egress, isIPv6: failover.isIPv6, excluding: failover.tried, now: now) {
            case .reserved(let next):
                connections[failover.id] = (entry.connection, next, entry.generation)
                failover.answer(.reserved(next))
                return true
            case .noAddressOfFamily:
                failover.answer(.noneLeft)
                return true
            case .busy:
                return false
            }
        }
        waiting.serve { waiter in
            if waiter.client.peerHasReset() {
                endWaiter(waiter, .clientReset)
                return true
            }
            return serve(waiter)
        }
    }

    /// At the connection limit the listener stops taking clients; the kernel's backlog holds them.
    private func updateAccepting() {
        listener?.setAccepting(!isStopping && connections.count + waiting.count < spec.maxConnections)
    }

    private func finishStopIfDone() {
        guard isStopping, connections.isEmpty, !stopCompletions.isEmpty else { return }
        let completions = stopCompletions
        stopCompletions = []
        for completion in completions { completion() }
    }
}
