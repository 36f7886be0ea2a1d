import CSamePortShims
import Dispatch
import Glibc
import Logging
import SamePortCore
import Synchronization

/// One relay: a listener, the bookkeeping of the 4-tuples in use, the clients waiting for one,
/// and the open connections.
///
/// Concurrency model: the listener is served by every shard (`EventLoopGroup`), and a connection
/// lives on the shard that accepted its client. What the shards share (the 4-tuple bookings, the
/// wait queue, the open connections, the counters) is `Shared`, behind one lock held only for
/// bookkeeping: no syscall but a reset check of a queued client, no log line. Work that follows
/// from a change (start a connection, answer a failover, end a queued client) is collected while
/// the lock is held and done after it is released, on the shard that owns it.
public final class Relay: @unchecked Sendable {  // mutable state is in `shared`; the rest is set before start
    /// The relay's name: what a reload matches relays by, and a passed socket's name.
    public let name: String
    /// The address the listener is bound to (with the real port, once started). Like
    /// `listenerAcceptsIPv4`, written once by `start` before any shard accepts and only read after,
    /// so every client's accept and dial skips the runtime exclusivity check on it.
    @exclusivity(unchecked) public private(set) var listenEndpoint: Endpoint?
    /// The address the relay listens on, for log lines: the bound socket's, else as configured.
    public var listenDescription: String { listenEndpoint.map(\.description) ?? "\(spec.listen)" }
    /// False for a wildcard `[::]` listener that takes IPv6 clients only (IPV6_V6ONLY).
    @exclusivity(unchecked) private(set) var listenerAcceptsIPv4 = true
    /// True when the listener is a socket systemd passed (socket activation).
    public private(set) var isInherited = false
    /// The socket from systemd belonged to another user and was made this process's (CAP_CHOWN).
    public private(set) var tookOverSocket = false
    /// Called (on a shard) with a message and its errno if the listener fails for good; the
    /// process should stop with exit 1. Set before `startAccepting()`.
    public var onFatalError: (@Sendable (String, Int32) -> Void)?

    private let logger: Logger
    private var group: EventLoopGroup?
    private let shared: Mutex<Shared>

    /// At most one "accept paused" line per this long (nanoseconds); the next counts the rest.
    private static let pauseLogInterval: UInt64 = 10_000_000_000

    /// How long an upstream that refused or timed out is passed over (nginx's fail_timeout).
    private static let downTime = Duration.seconds(10)

    /// An open connection, with the upstream it has booked (none while it fails over) and the
    /// generation of the spec it started under.
    private struct Entry {
        var connection: Connection
        var reservation: UpstreamSelector.Reservation?
        var generation: Int
    }

    /// A connection whose upstream failed, waiting for another one to free up.
    private struct Failover {
        var connection: Connection
        var tried: Set<Int>
    }

    /// What the shards share, behind `shared`'s lock.
    private struct Shared {
        var spec: RelaySpec
        var context: ConnectionContext
        /// Bumped by each `reconfigure`: upstream indices of older connections mean another list.
        var generation = 0
        var selector: UpstreamSelector
        var waiting: WaitQueue<QueuedClient>
        var connections: [ObjectIdentifier: Entry] = [:]
        /// Clients whose PROXY header is being read (accept_proxy): not yet judged or served.
        var headerReaders: [ObjectIdentifier: ProxyHeaderReader] = [:]
        /// Connections failing over, served before queued clients: they were accepted earlier.
        var failingOver: [Failover] = []
        var listener: Listener?
        /// What the listener was last told (`updateAccepting`).
        var accepting = false
        var isStopping = false
        /// Places under max_connections taken by shards that are accepting a client right now.
        var acceptsInFlight = 0
        /// The drain is over: whatever is left is ended, and a connection whose upstream fails
        /// gets no other.
        var isCut = false
        var stopCompletions: [@Sendable () -> Void] = []
        /// Clients handed to a connection since start.
        var served = 0
        /// What each client address holds (connections and queued clients), for max_per_client.
        var perClient = ClientCounts()

        /// What max_connections bounds: open connections, queued clients, and clients whose
        /// PROXY header is being read.
        var openCount: Int { connections.count + waiting.count + headerReaders.count }
    }

    /// Work to do once the lock is released.
    private typealias Actions = [() -> Void]

    /// - Parameters:
    ///   - spec: a spec with no `problems()`.
    ///   - upstreams: the resolved addresses of each of `spec.upstreams`, in the same order.
    public init(spec: RelaySpec, upstreams: [[Endpoint]], logger: Logger) {
        self.name = spec.name
        self.logger = logger
        shared = Mutex(Shared(
            spec: spec, context: ConnectionContext(spec: spec, logger: logger),
            selector: UpstreamSelector(upstreams: upstreams), waiting: WaitQueue(limit: spec.queueLimit)))
    }

    /// The spec new connections are made with; a reload may replace it (`reconfigure`).
    public var spec: RelaySpec { shared.withLock { $0.spec } }

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
        let group: EventLoopGroup
        do {
            group = try EventLoopGroup.shared()
        } catch {
            throw StartupError("cannot start the event loops: \(error): each event loop needs 2 descriptors: raise the limit on open files (LimitNOFILE=, ulimit -n) or lower --threads", isTemporary: true, errno: error.errno)
        }
        let listener: Listener
        if let inherited {
            listener = try Listener.adopt(fd: inherited.fd, label: inherited.label)
        } else {
            switch spec.listen.host {
            case .any:
                listener = try Listener.openWildcard(port: spec.listen.port, exclusive: !sharedWithOwnRelay, transparent: spec.transparent)
            case .ip(let address):
                listener = try Listener.open(Endpoint(address, spec.listen.port), dualStack: false, exclusive: !sharedWithOwnRelay, transparent: spec.transparent)
            case .name:
                throw StartupError("cannot listen on \(spec.listen): listen on an IP address or *:PORT")
            }
        }
        do {
            if let inherited {
                try prepareInherited(listener, inherited)
                if spec.transparent { try listener.makeTransparent() }
            } else {
                try probeEgress(listener.endpoint)
            }
            try checkFamilies(listener.endpoint)
            listenerAcceptsIPv4 = (try? listener.listeningSocket.option(level: Int32(IPPROTO_IPV6), name: IPV6_V6ONLY)) != 1
            try refuseSelfDial(
                listener: listener.endpoint, acceptsIPv4: listenerAcceptsIPv4, spec: spec,
                upstreams: shared.withLock { $0.selector.upstreams })
        } catch {
            // A passed socket stays systemd's: it is closed here, never shut down.
            listener.close()
            throw error
        }
        listener.listeningSocket.setKeepaliveForClients(spec.keepalive)
        listenEndpoint = listener.endpoint
        isInherited = inherited != nil
        self.group = group
        shared.withLock { $0.listener = listener }
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

    /// Starts taking clients on the listener `open()` bound, on every shard.
    public func startAccepting() {
        guard let listener = shared.withLock({ $0.listener }), let group else { return }
        group.start()
        let name = name
        // Every shard meets a broken socket: the process hears of it once.
        let reported = Atomic<Bool>(false)
        // Out of descriptors, every shard pauses ten times a second for as long as it lasts: a
        // line at the first pause, then at most one per `Self.pauseLogInterval` with the count.
        let pauses = Mutex<(lastLogged: UInt64?, unlogged: Int)>((nil, 0))
        listener.serve(
            on: group,
            acceptNext: { [self] listener, loop throws(SystemError) in try acceptNext(from: listener, on: loop) },
            onFatalError: { [self, endpoint = listener.endpoint] error in
                guard !reported.exchange(true, ordering: .relaxed) else { return }
                let cure = error.errno == .invalidArgument
                    ? "the socket no longer listens (did a process sharing it shut it down?); restart sameport"
                    : "restart sameport"
                onFatalError?("relay \(name): accept on \(endpoint) failed: \(error): \(cure)", error.errno.rawValue)
            },
            onTemporaryFailure: { [logger] error in
                let now = Monotonic.now
                let unlogged = pauses.withLock { pauses -> Int? in
                    if let last = pauses.lastLogged, now &- last < Self.pauseLogInterval {
                        pauses.unlogged += 1
                        return nil
                    }
                    defer { pauses = (now, 0) }
                    return pauses.unlogged
                }
                guard let unlogged else { return }
                let since = unlogged > 0 ? " (and \(unlogged) more time(s) since the last such line)" : ""
                logger.warning("accept paused for 100ms\(since)", metadata: ["relay": .string(name), "cause": .stringConvertible(error)])
            })
        shared.withLock { updateAccepting(&$0) }
    }

    /// Closes the listener of a relay that was opened but will not run (another relay failed).
    public func close() {
        shared.withLock { shared -> Listener? in
            defer { shared.listener = nil }
            return shared.listener
        }?.close()
    }

    /// Binds an egress socket the way connections will, then closes it: a refusal here (another
    /// user owns the listener, SO_REUSEPORT off, a foreign egress IP) is a start-up error, not a
    /// failure on every client later.
    private func probeEgress(_ listenEndpoint: Endpoint, spec: RelaySpec? = nil) throws(StartupError) {
        let mode = (spec ?? self.spec).egress
        let binding = EgressBinding(mode: mode, local: listenEndpoint)
        do {
            try binding.makeSocket().close()
        } catch {
            let hint = EgressBinding.hint(for: error.errno) ?? "check --egress"
            // The probe of egress client binds this host's address the way clients' will be bound.
            let what = mode.presentsClient ? "egress \(mode) binds each client's own address with IP_TRANSPARENT" : "the egress cannot bind \(binding)"
            throw StartupError("\(what): \(error.errno): \(hint)", errno: error.errno)
        }
    }

    /// Refuses a relay whose egress can only be IPv4 (or IPv6) while no upstream has an address of
    /// that family: every client would fail. A wildcard listener can take either family.
    private func checkFamilies(_ listenEndpoint: Endpoint, spec: RelaySpec? = nil, upstreams: [[Endpoint]]? = nil) throws(StartupError) {
        let spec = spec ?? self.spec
        let egressAddress = EgressBinding(mode: spec.egress, local: listenEndpoint).address
        guard !egressAddress.isUnspecified, !spec.forwardsToOriginal, !spec.egress.presentsClient else { return }
        let family = egressAddress.familyName
        guard (upstreams ?? shared.withLock { $0.selector.upstreams }).contains(where: { $0.contains { $0.address.isIPv6 == egressAddress.isIPv6 } }) else {
            throw StartupError("no upstream has an \(family) address to dial from \(egressAddress); give an \(family) upstream, or listen on an address of the upstreams' family")
        }
    }

    /// The start-up checks of `open()` for a spec a reload would apply to this running relay: its
    /// egress binds beside the listener, and some upstream has an address of its family.
    public func check(spec newSpec: RelaySpec, upstreams: [[Endpoint]]) throws(StartupError) {
        guard let listenEndpoint else { return }
        // A socket from systemd that a reload makes transparent (one is never made plain again).
        if newSpec.transparent, !spec.transparent, let listener = shared.withLock({ $0.listener }) {
            try listener.makeTransparent()
        }
        try probeEgress(listenEndpoint, spec: newSpec)
        try checkFamilies(listenEndpoint, spec: newSpec, upstreams: upstreams.map { $0.map(\.unmapped) })
        try refuseSelfDial(listener: listenEndpoint, acceptsIPv4: listenerAcceptsIPv4, spec: newSpec, upstreams: upstreams)
    }

    /// Stops accepting; lets open connections finish, and queued clients (and connections failing
    /// over) be served as pairs free up, for up to `timeout`; then ends those left (logged
    /// `end=shutdown`); then calls `completion`. A second call (a shorter timeout: a second
    /// signal) cuts sooner; both completions run.
    public func drain(timeout: Duration, completion: @escaping @Sendable () -> Void) {
        var actions: Actions = []
        let (listener, isEmpty, completions) = shared.withLock { shared in
            shared.isStopping = true
            shared.stopCompletions.append(completion)
            let listener = shared.listener
            shared.listener = nil
            // A client still sending its PROXY header has not been admitted: it ends now.
            for reader in shared.headerReaders.values {
                actions.append { reader.loop.execute { reader.stop() } }
            }
            return (listener, shared.connections.isEmpty && shared.waiting.isEmpty && shared.headerReaders.isEmpty, finishStopIfDone(&shared))
        }
        listener?.close()
        for action in actions { action() }
        if timeout <= .zero {
            cutConnections()
        } else if !isEmpty {
            DispatchQueue.global().asyncAfter(deadline: .now() + timeout.dispatchInterval) { [self] in cutConnections() }
        }
        for completion in completions { completion() }
    }

    /// The end of a drain: queued clients are reset, connections failing over told to stop, and
    /// open connections cut.
    private func cutConnections() {
        var actions: Actions = []
        let (connections, completions) = shared.withLock { shared in
            shared.isCut = true
            for waiter in shared.waiting.removeAll() {
                shared.perClient.remove(waiter.arrival.clientEndpoint.address)
                actions.append { [self] in endQueued(waiter, .shutdown) }
            }
            for failover in shared.failingOver {
                actions.append { Self.answer(failover.connection, .stopping) }
            }
            shared.failingOver.removeAll()
            return (shared.connections.values.map(\.connection), finishStopIfDone(&shared))
        }
        for action in actions { action() }
        for connection in connections {
            connection.loop.execute { connection.stop() }
        }
        for completion in completions { completion() }
    }

    /// Live counts, for the service manager's status line.
    public struct Counts: Sendable, Equatable {
        public var open: Int
        public var queued: Int
        public var served: Int
    }

    public func counts() -> Counts {
        shared.withLock { Counts(open: $0.connections.count, queued: $0.waiting.count, served: $0.served) }
    }

    /// Applies a reloaded spec (same name, same listener) to new connections: open connections
    /// go on with the settings they started with, and keep their upstream booked.
    public func reconfigure(spec newSpec: RelaySpec, upstreams: [[Endpoint]]) {
        var actions: Actions = []
        shared.withLock { shared in
            if newSpec.keepalive != shared.spec.keepalive {
                // Clients accepted from now on; open connections keep theirs.
                shared.listener?.listeningSocket.setKeepaliveForClients(newSpec.keepalive)
            }
            shared.spec = newSpec
            shared.context = ConnectionContext(spec: newSpec, logger: logger)
            shared.generation += 1
            shared.selector = UpstreamSelector(upstreams: upstreams)
            for entry in shared.connections.values {
                if let reservation = entry.reservation { shared.selector.adopt(reservation) }
            }
            shared.waiting.limit = newSpec.queueLimit
            serveWaiters(&shared, &actions)
            updateAccepting(&shared)
        }
        for action in actions { action() }
    }

    // MARK: Accepting

    /// Accepts the next client waiting on `listener`, on `loop`: refused, served, rejected or
    /// queued. False when no client is waiting.
    ///
    /// accept4 runs without the relay's lock: a place under `--max-connections` is taken first
    /// (`acceptsInFlight`, under the lock), then the client is accepted, then judged under the
    /// lock. Holding the lock across the system call made the other shards wait on it (measured:
    /// with two shards each connection cost the relay some 10 % more CPU than with one). Clients
    /// that two shards accept at the same moment may so enter the wait queue in either order.
    private func acceptNext(from listener: Socket, on loop: EventLoop) throws(SystemError) -> Bool {
        // The limit and a stop hold here, whatever the shards' registrations still say.
        let hasRoom = shared.withLock { shared -> Bool in
            guard !shared.isStopping, shared.openCount + shared.acceptsInFlight < shared.spec.maxConnections else { return false }
            shared.acceptsInFlight += 1
            return true
        }
        guard hasRoom else { return false }
        let accepted = Result { () throws(SystemError) in try listener.accept() }
        guard case .success(let (client, acceptedPeer)?) = accepted else {
            // Nobody waiting, or accept4 failed: the place goes back, and the error on.
            shared.withLock { $0.acceptsInFlight -= 1 }
            _ = try accepted.get()
            return false
        }
        let acceptedAt = Monotonic.now
        // The local address is the listener's, unless it listens on every address.
        guard let local = listenEndpoint.flatMap({ $0.address.isUnspecified ? nil : $0 }) ?? (try? client.localEndpoint()),
              let peer = acceptedPeer ?? (try? client.peerEndpoint()) else {
            shared.withLock { $0.acceptsInFlight -= 1 }
            client.close()  // reset before we looked at it
            ConnectionLog(
                relay: name, client: "-", egress: "-", upstream: "-", bytesToUpstream: 0, bytesToClient: 0,
                duration: .nanoseconds(Int64(clamping: Monotonic.now &- acceptedAt)), end: .clientReset
            ).log(to: logger)
            return true
        }
        let (outcome, arrival, completions) = shared.withLock { shared -> (AcceptOutcome, Arrival, [@Sendable () -> Void]) in
            shared.acceptsInFlight -= 1
            var arrival = Arrival(
                client: client, clientEndpoint: peer.unmapped, reached: local.unmapped, local: local,
                binding: EgressBinding(mode: shared.spec.egress, local: local), acceptedAt: acceptedAt, loop: loop)
            // A stop that began while accept4 ran: this client is not served.
            guard !shared.isStopping else { return (.ended(.shutdown), arrival, finishStopIfDone(&shared)) }
            if shared.spec.acceptProxy { return (readHeader(&shared, arrival), arrival, []) }
            return (admit(&shared, &arrival), arrival, [])
        }
        carryOut(outcome, arrival)
        for completion in completions { completion() }
        return true
    }

    /// Judges a client whose address is known (allow/deny) and serves, rejects or queues it;
    /// under the lock. What it decides is carried out once the lock is released (`carryOut`).
    private func admit(_ shared: inout Shared, _ arrival: inout Arrival) -> AcceptOutcome {
        if let refusal = shared.spec.access.refusal(of: arrival.clientEndpoint.address) {
            return .ended(.refused(cause: refusal))
        }
        let limit = shared.spec.maxPerClient
        if limit > 0, shared.perClient[arrival.clientEndpoint.address] >= limit {
            return .ended(.clientLimit(limit: limit))
        }
        if let refusal = Self.route(&arrival, spec: shared.spec, listener: listenEndpoint) {
            return .ended(.refused(cause: refusal))
        }
        // A header sent onward names the destination the client dialled, unless one announced it.
        if let destination = arrival.destination, !shared.spec.acceptProxy { arrival.reached = destination }
        let outcome = serve(&shared, arrival)
        switch outcome {
        case .busy:
            switch shared.spec.onBusy {
            case .reject:
                return .ended(.busyRejected)
            case .ephemeral:
                let fixed = arrival.binding
                arrival.binding = fixed.withKernelPort
                switch serve(&shared, arrival) {
                case .started(let connection):
                    shared.perClient.add(arrival.clientEndpoint.address)
                    return .startedEphemeral(connection, from: fixed)
                case .busy: return .ended(.connectFailed(cause: "no upstream address"))
                case .ended(let end): return .ended(end)
                }
            case .queue:
                guard !shared.waiting.isFull else { return .ended(.queueFull) }
                let waiter = QueuedClient(arrival, relay: self, connectTimeout: shared.spec.connectTimeout)
                guard let ticket = shared.waiting.append(waiter) else { return .ended(.queueFull) }
                waiter.ticket = ticket
                shared.perClient.add(arrival.clientEndpoint.address)
                updateAccepting(&shared)
                return .queued(waiter, position: shared.waiting.count)
            }
        case .started(let connection):
            shared.perClient.add(arrival.clientEndpoint.address)
            updateAccepting(&shared)
            return .started(connection)
        case .ended(let end):
            return .ended(end)
        }
    }

    /// Does what `admit` (or `readHeader`) decided, on the arrival's shard, without the lock.
    private func carryOut(_ outcome: AcceptOutcome, _ arrival: Arrival) {
        let acceptedAt = arrival.acceptedAt
        switch outcome {
        case .started(let connection):
            connection.start()
        case .startedEphemeral(let connection, let fixed):
            logger.notice("every upstream is in use from \(fixed): dialling from an ephemeral port", metadata: ["relay": .string(name), "client": .stringConvertible(arrival.clientEndpoint)])
            connection.start()
        case .ended(let end):
            endArrival(arrival, end)
        case .queued(let waiter, let position):
            if logger.logLevel <= .debug {
                logger.debug("queued: every upstream is in use from this egress", metadata: [
                    "relay": .string(name), "client": .stringConvertible(arrival.clientEndpoint),
                    "egress": .stringConvertible(arrival.binding), "waiting": .stringConvertible(position)])
            }
            arrival.loop.setDeadline(waiter, at: acceptedAt &+ UInt64(max(0, waiter.connectTimeout.nanoseconds)))
            waiter.watch()
        case .readingHeader(let reader):
            reader.start()
        }
    }

    // MARK: PROXY protocol headers

    /// accept_proxy: a client from a trusted sender gets a reader for its PROXY header, counted
    /// like an open connection; any other is refused. Under the lock.
    private func readHeader(_ shared: inout Shared, _ arrival: Arrival) -> AcceptOutcome {
        let sender = arrival.clientEndpoint.address
        guard shared.spec.acceptProxyFrom.contains(where: { $0.contains(sender) }) else {
            let blocks = shared.spec.acceptProxyFrom.map(\.description).joined(separator: ", ")
            return .ended(.refused(cause: "the sender is in no accept_proxy_from block (\(blocks)): it may not announce a client"))
        }
        let reader = ProxyHeaderReader(arrival, relay: self, timeout: shared.spec.proxyTimeout)
        shared.headerReaders[ObjectIdentifier(reader)] = reader
        updateAccepting(&shared)
        return .readingHeader(reader)
    }

    /// A client's PROXY header is read (on its shard): the announced client is judged and served
    /// as if it had just been accepted.
    func headerRead(_ reader: ProxyHeaderReader) {
        var arrival = reader.arrival
        let (outcome, completions) = shared.withLock { shared -> (AcceptOutcome, [@Sendable () -> Void]) in
            shared.headerReaders.removeValue(forKey: ObjectIdentifier(reader))
            guard !shared.isStopping else { return (.ended(.shutdown), finishStopIfDone(&shared)) }
            defer { updateAccepting(&shared) }
            return (admit(&shared, &arrival), [])
        }
        carryOut(outcome, arrival)
        for completion in completions { completion() }
    }

    /// A client's PROXY header failed, or the relay is stopping (on its shard): the client is
    /// closed with its log line.
    func headerFailed(_ reader: ProxyHeaderReader, _ end: ConnectionEnd) {
        let completions = shared.withLock { shared -> [@Sendable () -> Void] in
            guard shared.headerReaders.removeValue(forKey: ObjectIdentifier(reader)) != nil else { return [] }
            updateAccepting(&shared)
            return finishStopIfDone(&shared)
        }
        endArrival(reader.arrival, end)
        for completion in completions { completion() }
    }

    /// A client accepted and not yet handed to a connection.
    struct Arrival {
        var client: Socket
        /// The client: the peer of the accepted socket, or the client its PROXY header announced
        /// (accept_proxy). Everything downstream uses this one value: allow/deny, the egress of
        /// `egress = "client"` (see Relay+Routing.swift), the log line, the PROXY header sent upstream.
        var clientEndpoint: Endpoint
        /// The address the client reached: the accepted socket's local address, the destination
        /// its PROXY header announced, or (upstream = "original") its original destination. A
        /// PROXY header sent upstream announces it.
        var reached: Endpoint
        /// The accepted socket's own address (or the listener's).
        var local: Endpoint
        /// With `upstream = "original"`: where the client is forwarded.
        var destination: Endpoint?
        var binding: EgressBinding
        var acceptedAt: UInt64
        var loop: EventLoop
    }

    private enum AcceptOutcome {
        case started(Connection)
        case startedEphemeral(Connection, from: EgressBinding)
        case ended(ConnectionEnd)
        case queued(QueuedClient, position: Int)
        /// Waiting for its PROXY header (accept_proxy).
        case readingHeader(ProxyHeaderReader)
    }

    private enum ServeOutcome {
        case started(Connection)
        /// Every upstream is in use from that egress.
        case busy
        case ended(ConnectionEnd)
    }

    /// Books an upstream for the arrival and makes its connection (started by the caller, on the
    /// arrival's shard, once the lock is released).
    private func serve(_ shared: inout Shared, _ arrival: Arrival) -> ServeOutcome {
        let booked = arrival.binding.bookedEndpoint
        let outcome = arrival.destination.map { shared.selector.reserve(egress: booked, destination: $0) }
            ?? shared.selector.reserve(egress: booked, isIPv6: arrival.binding.isIPv6, now: Monotonic.now)
        switch outcome {
        case .busy:
            return .busy
        case .noAddressOfFamily:
            return .ended(.connectFailed(cause: "no upstream has an \(arrival.binding.address.familyName) address to dial from \(arrival.binding)"))
        case .reserved(let reservation):
            let connection = Connection(
                client: arrival.client, clientEndpoint: arrival.clientEndpoint, reached: arrival.reached, acceptedAt: arrival.acceptedAt,
                binding: arrival.binding, reservation: reservation, context: shared.context, relay: self, loop: arrival.loop)
            shared.connections[ObjectIdentifier(connection)] = Entry(connection: connection, reservation: reservation, generation: shared.generation)
            shared.served += 1
            return .started(connection)
        }
    }

    /// Resets a client that never got a connection, with its log line: a reset, not a FIN, so
    /// that the client learns it was not served (a FIN after nothing looks like an empty, successful
    /// session where the server speaks first), and no TIME_WAIT is left here.
    private func endArrival(_ arrival: Arrival, _ end: ConnectionEnd) {
        arrival.client.setResetOnClose()
        arrival.client.close()
        guard ConnectionLog.isLogged(end, by: logger) else { return }
        ConnectionLog(
            relay: name, client: arrival.clientEndpoint.description, egress: arrival.binding.description,
            upstream: arrival.destination?.description ?? "-", bytesToUpstream: 0, bytesToClient: 0,
            duration: .nanoseconds(Int64(clamping: Monotonic.now &- arrival.acceptedAt)), end: end
        ).log(to: logger)
    }

    /// Ends a queued client, on its shard (where its deadline and registration are).
    private func endQueued(_ waiter: QueuedClient, _ end: ConnectionEnd) {
        waiter.arrival.loop.execute { [self] in
            waiter.leaveShard()
            endArrival(waiter.arrival, end)
        }
    }

    /// A queued client's wait ran out, or it reset while it waited (on its shard): it leaves the
    /// queue, and its place there, under max_per_client and under max_connections is free at once.
    /// Nothing when it was served or ended meanwhile: that task, queued on this shard, follows.
    fileprivate func leaveQueue(_ waiter: QueuedClient, _ end: ConnectionEnd) {
        let (removed, completions) = shared.withLock { shared -> (Bool, [@Sendable () -> Void]) in
            guard shared.waiting.remove(ticket: waiter.ticket) != nil else { return (false, []) }
            shared.perClient.remove(waiter.arrival.clientEndpoint.address)
            updateAccepting(&shared)
            return (true, finishStopIfDone(&shared))
        }
        if removed {
            waiter.leaveShard()
            endArrival(waiter.arrival, end)
        }
        for completion in completions { completion() }
    }

    // MARK: Connections

    private static func answer(_ connection: Connection, _ answer: Connection.UpstreamReplacement) {
        connection.loop.execute { connection.replaceUpstream(answer) }
    }

    /// A connection could not reach its upstream (on its shard): frees that upstream, passes it
    /// over for a while (logged with `cause`, each address's failure), and hands the connection
    /// another it has not tried: at once if one is free, later if one is busy.
    func upstreamFailed(_ connection: Connection, tried: Set<Int>, cause: String) {
        var actions: Actions = []
        let id = ObjectIdentifier(connection)
        let passedOver = shared.withLock { shared -> String? in
            guard var entry = shared.connections[id] else {
                actions.append { Self.answer(connection, .noneLeft) }
                return nil
            }
            guard !shared.isCut else {
                actions.append { Self.answer(connection, .stopping) }
                return nil
            }
            var passedOver: String?
            if let reservation = entry.reservation {
                shared.selector.release(reservation)
                // A connection from before a reload knows upstreams by the old list's indices: it
                // gets none of the new list (rare: it was still dialling when the reload landed).
                if entry.generation == shared.generation {
                    shared.selector.markDown(reservation.upstreamIndex, until: Monotonic.now &+ UInt64(Self.downTime.nanoseconds))
                    if shared.selector.upstreams.count > 1 { passedOver = "\(shared.spec.upstreams[reservation.upstreamIndex])" }
                }
            }
            entry.reservation = nil
            shared.connections[id] = entry
            if entry.generation == shared.generation {
                shared.failingOver.append(Failover(connection: connection, tried: tried))
            } else {
                actions.append { Self.answer(connection, .noneLeft) }
            }
            serveWaiters(&shared, &actions)
            updateAccepting(&shared)
            return passedOver
        }
        if let passedOver {
            logger.warning("upstream \(passedOver) failed to connect: passed over for \(Self.downTime.shortDescription)",
                           metadata: ["relay": .string(name), "cause": .string(cause)])
        }
        for action in actions { action() }
    }

    /// A connection's pair was held although this relay had it free (EADDRNOTAVAIL: another
    /// process, or a relay of ours still draining on this address after a reload moved it away
    /// and back): hands it another free upstream at once, releasing the held one's booking, so
    /// that it does not wait out the connect timeout on that pair. nil when none is free: it keeps
    /// retrying the held pair.
    func swapHeldPair(_ connection: Connection, excluding tried: Set<Int>) -> UpstreamSelector.Reservation? {
        let id = ObjectIdentifier(connection)
        let now = Monotonic.now
        return shared.withLock { shared -> UpstreamSelector.Reservation? in
            guard var entry = shared.connections[id], entry.generation == shared.generation,
                  let held = entry.reservation else { return nil }
            let binding = connection.binding
            guard case .reserved(let next) = shared.selector.reserve(
                egress: binding.bookedEndpoint, isIPv6: binding.isIPv6, excluding: tried, now: now) else { return nil }
            shared.selector.release(held)
            entry.reservation = next
            shared.connections[id] = entry
            return next
        }
    }

    /// A connection has ended (on its shard): its upstream goes to the next in line.
    func connectionEnded(_ connection: Connection) {
        var actions: Actions = []
        let completions = shared.withLock { shared -> [@Sendable () -> Void] in
            guard let entry = shared.connections.removeValue(forKey: ObjectIdentifier(connection)) else { return [] }
            shared.perClient.remove(connection.clientEndpoint.address)
            if let reservation = entry.reservation { shared.selector.release(reservation) }
            serveWaiters(&shared, &actions)
            updateAccepting(&shared)
            return finishStopIfDone(&shared)
        }
        for action in actions { action() }
        for completion in completions { completion() }
    }

    /// Serves connections failing over, then queued clients, oldest first, while upstreams are
    /// free; drops queued clients that reset. The connections are started after the lock is
    /// released, each on its own shard (the shard that accepted its client).
    private func serveWaiters(_ shared: inout Shared, _ actions: inout Actions) {
        // The common case, at every connection's end: nobody waits.
        guard !shared.failingOver.isEmpty || !shared.waiting.isEmpty else { return }
        let now = Monotonic.now
        let generation = shared.generation
        var failingOver = shared.failingOver
        failingOver.removeAll { failover in
            let id = ObjectIdentifier(failover.connection)
            guard var entry = shared.connections[id] else { return true }  // ended meanwhile
            // Its `tried` holds the old list's indices: as in upstreamFailed, no new upstream.
            guard entry.generation == generation else {
                actions.append { Self.answer(failover.connection, .noneLeft) }
                return true
            }
            let binding = failover.connection.binding
            switch shared.selector.reserve(egress: binding.bookedEndpoint, isIPv6: binding.isIPv6, excluding: failover.tried, now: now) {
            case .reserved(let next):
                entry.reservation = next
                shared.connections[id] = entry
                actions.append { Self.answer(failover.connection, .reserved(next)) }
                return true
            case .noAddressOfFamily:
                actions.append { Self.answer(failover.connection, .noneLeft) }
                return true
            case .busy:
                return false
            }
        }
        shared.failingOver = failingOver
        var waiting = shared.waiting
        shared.waiting = WaitQueue(limit: waiting.limit)
        waiting.serve { waiter in
            if waiter.arrival.client.peerHasReset() {
                shared.perClient.remove(waiter.arrival.clientEndpoint.address)
                actions.append { [self] in endQueued(waiter, .clientReset) }
                return true
            }
            switch serve(&shared, waiter.arrival) {
            case .busy:
                return false
            case .ended(let end):
                shared.perClient.remove(waiter.arrival.clientEndpoint.address)
                actions.append { [self] in endQueued(waiter, end) }
                return true
            case .started(let connection):
                actions.append {
                    let loop = waiter.arrival.loop
                    loop.execute {
                        waiter.leaveShard()  // the connection registers the client itself
                        connection.start()
                    }
                }
                return true
            }
        }
        shared.waiting = waiting
    }

    /// At the connection limit the listener stops taking clients; the kernel's backlog holds them.
    private func updateAccepting(_ shared: inout Shared) {
        let accepting = !shared.isStopping && shared.openCount < shared.spec.maxConnections
        guard accepting != shared.accepting, let listener = shared.listener else { return }
        shared.accepting = accepting
        listener.setAccepting(accepting)
    }

    private func finishStopIfDone(_ shared: inout Shared) -> [@Sendable () -> Void] {
        guard shared.isStopping, shared.connections.isEmpty, shared.waiting.isEmpty, shared.headerReaders.isEmpty,
              !shared.stopCompletions.isEmpty else { return [] }
        defer { shared.stopCompletions = [] }
        return shared.stopCompletions
    }
}

/// A client waiting in a relay's queue for a free upstream, bounded by the connect timeout (a
/// deadline on the shard that accepted it). Its socket is in that shard's epoll set meanwhile for
/// errors and hang-ups only: a client that resets leaves the queue at once, so its bytes are
/// never dialled onward and its place goes to the next client. A FIN alone keeps it waiting: a
/// client may half-close and still await its answer.
final class QueuedClient: EventHandler, DeadlineHandler, @unchecked Sendable {  // its deadline and registration are its shard's
    let arrival: Relay.Arrival
    let connectTimeout: Duration
    private let relay: Relay
    var ticket: UInt64 = 0
    var deadlineIndex = -1
    var deadline: UInt64 = 0
    private var registration: UInt64?

    init(_ arrival: Relay.Arrival, relay: Relay, connectTimeout: Duration) {
        self.arrival = arrival
        self.relay = relay
        self.connectTimeout = connectTimeout
    }

    func deadlineReached(now: UInt64) {
        relay.leaveQueue(self, .queueTimeout)
    }

    /// Watches the client for a reset while it waits (on its shard). Edge-triggered with no
    /// flags asked for: epoll reports EPOLLERR and EPOLLHUP always, and nothing else. If the
    /// registration fails, a reset is still found when the client's turn comes (`peerHasReset`).
    func watch() {
        registration = try? arrival.loop.register(fd: arrival.client.fd, events: sameport_epollet, handler: self, tag: 0)
    }

    /// Cancels its deadline and takes the client out of the shard's set (on its shard), once it
    /// is served (its connection registers the client again) or ended (the client is closed).
    func leaveShard() {
        arrival.loop.cancelDeadline(self)
        guard let registration else { return }
        self.registration = nil
        arrival.loop.deregister(fd: arrival.client.fd, id: registration)
    }

    func handle(events: UInt32, tag: UInt8) {
        guard events & (sameport_epollerr | sameport_epollhup) != 0 else { return }
        relay.leaveQueue(self, .clientReset)
    }
}
