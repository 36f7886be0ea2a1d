import CSamePortShims
import Dispatch
import Glibc
import Logging
import SamePortCore
import Synchronization

/// What the connections of one relay generation share: its settings and logger, held once.
final class ConnectionContext: Sendable {
    let relayName: String
    let connectTimeout: Duration
    /// The idle timeout in nanoseconds; nil: none.
    let idleTimeout: UInt64?
    /// Set on the upstream socket once the connection has relayed a second (the client has it
    /// from the listener).
    let keepalive: SocketKeepalive
    let bufferSize: Int
    /// The pipe size asked for the splice path; nil: read/write only.
    let pipeSize: Int?
    /// The bytes each direction copies before it splices.
    let spliceAfter: UInt64
    /// The PROXY protocol header to send upstream first; nil: none.
    let proxyProtocol: ProxyProtocolVersion?
    let logger: Logger
    /// `logger`'s level, read once: asking the log handler for it costs an existential copy, and
    /// every connection asks twice.
    let logLevel: Logger.Level

    init(spec: RelaySpec, logger: Logger) {
        relayName = spec.name
        connectTimeout = spec.connectTimeout
        idleTimeout = spec.idleTimeout.flatMap { $0 > .zero ? UInt64($0.nanoseconds) : nil }
        keepalive = SocketKeepalive(spec.keepalive)
        bufferSize = spec.bufferSize
        pipeSize = spec.splice == .on ? spec.pipeSize : nil
        spliceAfter = UInt64(spec.spliceAfter)
        proxyProtocol = spec.proxyProtocol
        self.logger = logger
        logLevel = logger.logLevel
    }
}

/// One client and its upstream: dials from the egress, then pumps both directions until the end.
///
/// Concurrency model: a connection lives on the shard (`EventLoop`) that accepted its client; its
/// sockets' events, its deadline and every call into it run on that shard's queue, so the state
/// below needs no lock. It is stored `@exclusivity(unchecked)`, like the shard's own: nothing else
/// touches it and no access overlaps another, and the runtime check of each access (a
/// thread-local lookup) cost about a tenth of the relay's user time per connection (perf, 8
/// clients churning). The relay's bookkeeping is shared by its shards under a lock; the
/// connection reports its end (and a failed upstream) to the relay from its shard.
///
/// Dialling: every address of the chosen upstream is tried in order, each attempt bounded by the
/// connect timeout. EADDRNOTAVAIL (the 4-tuple is held: TIME_WAIT, or another process) is retried
/// with a short backoff, the whole retrying bounded by the connect timeout too. When every address
/// failed, the relay hands over another upstream (failover) or the client is closed.
///
/// One deadline serves every phase: the connect timeout, the backoff, the wait for another
/// upstream, and the idle timeout while relaying.
final class Connection: EventHandler, DeadlineHandler, @unchecked Sendable {  // confined to `loop`
    /// The relay's answer when a connection asks for another upstream.
    enum UpstreamReplacement: Sendable {
        /// Try this upstream next.
        case reserved(UpstreamSelector.Reservation)
        /// Every upstream has been tried.
        case noneLeft
        /// The relay is stopping.
        case stopping
    }

    private enum State {
        case starting
        case connecting(address: Int)
        case backingOff
        /// Waiting for the relay to hand over another upstream (bounded by the connect timeout).
        case awaitingUpstream
        case relaying
        case ended
    }

    private static let clientTag: UInt8 = 0
    private static let upstreamTag: UInt8 = 1

    unowned let loop: EventLoop
    private let relay: Relay
    private let context: ConnectionContext
    private let client: Socket
    /// The registration ids in the shard's epoll set (0: none; an id never is 0).
    @exclusivity(unchecked) private var clientRegistration: UInt64 = 0
    @exclusivity(unchecked) private var upstream: Socket?
    @exclusivity(unchecked) private var upstreamRegistration: UInt64 = 0
    /// The client (announced by a PROXY header with accept_proxy): in the log line, and in the
    /// PROXY header sent upstream.
    let clientEndpoint: Endpoint
    /// The address the client reached (or that a PROXY header announced it reached).
    let reached: Endpoint
    let binding: EgressBinding
    private let acceptedAt: UInt64
    @exclusivity(unchecked) private var state = State.starting
    /// The upstream booked for this connection, and the others it tried before (failover).
    @exclusivity(unchecked) private(set) var reservation: UpstreamSelector.Reservation
    @exclusivity(unchecked) private var earlierUpstreams: [Int] = []
    @exclusivity(unchecked) private var clientToUpstream: Direction
    @exclusivity(unchecked) private var upstreamToClient: Direction
    /// The address connected to: its index in the reservation (-1: none yet).
    @exclusivity(unchecked) private var connectedAddress: Int32 = -1
    /// When the idle check last looked at the send queues (UInt64.max: never).
    @exclusivity(unchecked) private var lastLook = UInt64.max
    /// Why each address failed in the current round of attempts.
    @exclusivity(unchecked) private var failures: [String] = []
    @exclusivity(unchecked) private var sawAddressNotAvailable = false
    /// When retrying a held 4-tuple stops (0: not retrying), and how many retries so far.
    @exclusivity(unchecked) private var retryDeadline: UInt64 = 0
    @exclusivity(unchecked) private var retries: UInt32 = 0
    /// Bytes of the PROXY header that went through `clientToUpstream` (what the first write left):
    /// the log counts the client's bytes only.
    @exclusivity(unchecked) private var headerBytesQueued: UInt64 = 0
    /// Whether the upstream socket still waits for its keepalive settings (`keepaliveDelay`).
    @exclusivity(unchecked) private var upstreamKeepalivePending = false
    /// The client socket's epoll flags that arrived before relaying began, together.
    @exclusivity(unchecked) private var clientEventsWhileDialling: UInt32 = 0

    @exclusivity(unchecked) var deadlineIndex = -1
    @exclusivity(unchecked) var deadline: UInt64 = 0

    /// How long a connection relays before its upstream socket gets keepalive and
    /// TCP_USER_TIMEOUT: five setsockopt calls that most short connections never need (the first
    /// probe comes after `keepalive` of silence, 60 s by default, and a second's delay changes no
    /// bound that matters), and the cost of a churning relay's connection drops by them.
    private static let keepaliveDelay: UInt64 = 1_000_000_000

    /// The backoff for a held 4-tuple, doubling from 200 us to 50 ms: short first, since the pair
    /// is usually held by a connection that is closing right now (LAST_ACK on loopback takes
    /// microseconds). Only the retry count is kept per connection.
    private static func addressBackoff(retry: UInt32) -> UInt64 {
        UInt64(Backoff.delay(retry: retry, initial: .microseconds(200), maximum: .milliseconds(50)).nanoseconds)
    }

    init(
        client: Socket, clientEndpoint: Endpoint, reached: Endpoint, acceptedAt: UInt64, binding: EgressBinding,
        reservation: UpstreamSelector.Reservation, context: ConnectionContext, relay: Relay, loop: EventLoop
    ) {
        self.loop = loop
        self.relay = relay
        self.context = context
        self.client = client
        self.clientEndpoint = clientEndpoint
        self.reached = reached
        self.acceptedAt = acceptedAt
        self.binding = binding
        self.reservation = reservation
        clientToUpstream = Direction(
            fromSide: .client, capacity: context.bufferSize, pipeSize: context.pipeSize,
            spliceAfter: context.spliceAfter, now: acceptedAt)
        upstreamToClient = Direction(
            fromSide: .upstream, capacity: context.bufferSize, pipeSize: context.pipeSize,
            spliceAfter: context.spliceAfter, now: acceptedAt)
    }

    deinit {
        clientToUpstream.release()
        upstreamToClient.release()
    }

    /// Starts dialling the upstream; on `loop`.
    func start() {
        guard case .starting = state else { return }
        do {
            clientRegistration = try loop.registerSocket(client, handler: self, tag: Self.clientTag)
        } catch {
            return finish(.failed(cause: "client: \(error)"))
        }
        attempt(address: 0)
    }

    /// Ends the connection from outside (the relay is stopping); on `loop`.
    func stop() {
        finish(.shutdown)
    }

    // MARK: Events

    func handle(events: UInt32, tag: UInt8) {
        switch state {
        case .relaying:
            relay(events: events, on: tag == Self.clientTag ? .client : .upstream)
        case .ended:
            break
        case .starting, .connecting, .backingOff, .awaitingUpstream:
            // The client's events wait until relaying (the pumps start by reading), remembered so
            // that the first read knows whether a FIN may be behind the client's bytes.
            if tag == Self.clientTag {
                clientEventsWhileDialling |= events
            } else if case .connecting = state {
                concludeConnect(events: events)
            }
        }
    }

    func deadlineReached(now: UInt64) {
        switch state {
        case .connecting:
            concludeConnect(events: 0, deadlinePassed: true)
        case .backingOff:
            attempt(address: 0)
        case .awaitingUpstream:
            failDial("no other upstream became free within \(context.connectTimeout.shortDescription)")
        case .relaying:
            if upstreamKeepalivePending {
                upstreamKeepalivePending = false
                upstream?.setKeepalive(context.keepalive)
                guard let due = idleDeadline else { return }
                if due > now { return loop.setDeadline(self, at: due) }
            }
            checkIdle(now: now)
        case .starting, .ended:
            break
        }
    }

    private func setDeadline(after duration: Duration) {
        loop.setDeadline(self, at: Monotonic.now &+ UInt64(max(0, duration.nanoseconds)))
    }

    // MARK: Dialling

    private func attempt(address index: Int) {
        guard index < reservation.addresses.count else { return roundFailed() }
        let address = reservation.addresses[index]
        if relay.dialsItself(address) {
            failures.append("\(address): this relay's own listening address, not dialled (it would dial itself; \(SelfDial.fix))")
            return attempt(address: index + 1)
        }
        let socket: Socket
        do {
            socket = try binding.makeSocket()
        } catch {
            let hint = EgressBinding.hint(for: error.errno).map { " (\($0))" } ?? ""
            return finish(.connectFailed(cause: "egress \(binding): \(error)\(hint)"))
        }
        let connectedAtOnce: Bool
        do {
            connectedAtOnce = try socket.connect(to: address)
        } catch {
            socket.close()
            if error.errno == .addressNotAvailable { sawAddressNotAvailable = true }
            failures.append("\(address): \(error)")
            return attempt(address: index + 1)
        }
        // Registered after connect(): the registration reports the socket's state as it is then,
        // so a connect that finished meanwhile is not missed (edge-triggered epoll).
        do {
            upstreamRegistration = try loop.registerSocket(socket, handler: self, tag: Self.upstreamTag)
        } catch {
            socket.close()
            return finish(.failed(cause: "upstream: \(error)"))
        }
        upstream = socket
        state = .connecting(address: index)
        if connectedAtOnce {
            return didConnect(address: address)
        }
        setDeadline(after: context.connectTimeout)
    }

    /// Decides how a connect in progress ended: on its socket's event, or at the deadline.
    /// Writable without an error or hang-up is connected (tcp(7)); otherwise SO_ERROR says why,
    /// read once: reading it clears it.
    private func concludeConnect(events: UInt32, deadlinePassed: Bool = false) {
        guard case .connecting(let index) = state, let upstream else { return }
        let address = reservation.addresses[index]
        if events & (sameport_epollerr | sameport_epollhup) == 0, events & sameport_epollout != 0 {
            return didConnect(address: address, events: events)
        }
        let error = upstream.pendingError()
        if error == nil {
            if events & sameport_epollout != 0 { return didConnect(address: address, events: events) }
            if !deadlinePassed { return }  // not finished yet
            // At the deadline with no error: connected if it has a peer, else still in progress.
            if (try? upstream.peerEndpoint()) != nil { return didConnect(address: address) }
        }
        closeUpstream(reset: false)
        let cause = error.map { "\(SystemError("connect", $0))" }
            ?? "connect timed out after \(context.connectTimeout.shortDescription)"
        failures.append("\(address): \(cause)")
        attempt(address: index + 1)
    }

    /// Every address of the upstream failed: retry a held 4-tuple, fail over, or give up.
    private func roundFailed() {
        let now = Monotonic.now
        if sawAddressNotAvailable {
            // Held outside this relay's bookings: another free upstream beats waiting for it.
            if retries == 0, let next = relay.swapHeldPair(self, excluding: Set(earlierUpstreams + [reservation.upstreamIndex])) {
                earlierUpstreams.append(reservation.upstreamIndex)
                reservation = next
                failures.removeAll()
                sawAddressNotAvailable = false
                return attempt(address: 0)
            }
            let deadline = retryDeadline != 0 ? retryDeadline : now &+ UInt64(max(0, context.connectTimeout.nanoseconds))
            retryDeadline = deadline
            guard now < deadline else {
                return failDial("the 4-tuple from \(binding) stayed held (TIME_WAIT or another process); add upstreams or use --on-busy ephemeral")
            }
            state = .backingOff
            failures.removeAll()
            sawAddressNotAvailable = false
            loop.setDeadline(self, at: min(now &+ Self.addressBackoff(retry: retries), deadline))
            retries += 1
            return
        }
        // A client's original destination has no other upstream to fail over to.
        if reservation.isOriginalDestination { return failDial() }
        // Fail over to another upstream: at once if one is free, else when one frees up, within
        // the connect timeout.
        state = .awaitingUpstream
        setDeadline(after: context.connectTimeout)
        earlierUpstreams.append(reservation.upstreamIndex)
        relay.upstreamFailed(self, tried: Set(earlierUpstreams), cause: failures.joined(separator: "; "))
    }

    /// The relay's answer to `Relay.upstreamFailed`; on `loop`.
    func replaceUpstream(_ answer: UpstreamReplacement) {
        guard case .awaitingUpstream = state else { return }
        switch answer {
        case .reserved(let next):
            loop.cancelDeadline(self)
            reservation = next
            retries = 0
            retryDeadline = 0
            attempt(address: 0)
        case .noneLeft:
            failDial()
        case .stopping:
            finish(.shutdown)
        }
    }

    /// Ends a connection that never reached an upstream, naming every cause.
    private func failDial(_ last: String? = nil) {
        finish(.connectFailed(cause: (failures + (last.map { [$0] } ?? [])).joined(separator: "; ")))
    }

    // MARK: Relaying

    /// - Parameter events: the upstream socket's event that told the connect had finished, if one
    ///   did: without a readable flag in it, nothing has arrived from the upstream yet, and its
    ///   first bytes raise a new edge (so the first read, which would find nothing, is skipped).
    private func didConnect(address: Endpoint, events: UInt32? = nil) {
        loop.cancelDeadline(self)
        state = .relaying
        if let index = reservation.addresses.firstIndex(of: address) { connectedAddress = Int32(index) }
        guard let upstream else { return }
        if context.logLevel <= .debug {
            context.logger.debug("connected", metadata: [
                "relay": .string(context.relayName), "client": .stringConvertible(clientEndpoint),
                "egress": .string(egressDescription), "upstream": .stringConvertible(address)])
        }
        // A relay forwards what it reads as soon as it reads it: Nagle would only add delay. The
        // client has it, and its keepalive, from the listener (Linux copies both to accepted sockets).
        try? upstream.setOption(level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1)
        if let version = context.proxyProtocol, !sendProxyHeader(version, to: upstream) { return }
        // The upstream's keepalive waits until the connection has lived a second (see
        // `keepaliveDelay`); the idle timeout's first look comes when it may have passed.
        let now = Monotonic.now
        var next = UInt64.max
        if context.keepalive.isOn {
            upstreamKeepalivePending = true
            next = now &+ Self.keepaliveDelay
        }
        if let idleTimeout = context.idleTimeout { next = min(next, now &+ idleTimeout) }
        if next != .max { loop.setDeadline(self, at: next) }
        // The client's edges came while dialling: they say what a short first read means.
        pump(.clientToUpstream, edge: Self.readEdge(clientEventsWhileDialling))
        if let events, events & Self.readableEvents == 0 {
            upstreamToClient.awaitRead()
        } else {
            pump(.upstreamToClient, edge: events.map(Self.readEdge) ?? .unknown)
        }
    }

    /// The epoll flags after which a read may find something (bytes, EOF, an error, urgent data).
    private static let readableEvents = sameport_epollin | closingEvents
    /// The flags that say a read may not stop at a short read: the peer closed or reset, or sent
    /// urgent data (a read ends early at its mark).
    private static let closingEvents = sameport_epollpri | sameport_epollrdhup | sameport_epollhup | sameport_epollerr

    /// What a readable socket's epoll flags say a short read means (see `Direction.ReadEdge`).
    private static func readEdge(_ events: UInt32) -> Direction.ReadEdge {
        if events & closingEvents == 0 { return .bytes }
        if events & sameport_epollrdhup != 0, events & (sameport_epollerr | sameport_epollpri) == 0 { return .bytesAndFIN }
        return .unknown
    }

    /// Writes the PROXY header to the new upstream connection, before any byte of the client's.
    ///
    /// A new connection's send buffer is empty, so the header (at most 107 bytes) goes at once;
    /// whatever the socket did not take is queued first in `clientToUpstream`, which delivers it
    /// before it reads the client, on either path. False when the connection ended.
    private func sendProxyHeader(_ version: ProxyProtocolVersion, to upstream: Socket) -> Bool {
        let header = ProxyHeader(version: version, addresses: ProxyAddresses(source: clientEndpoint, destination: reached)).encoded()
        var written = 0
        do throws(SystemError) {
            while written < header.count {
                let result = header.withUnsafeBytes { raw -> Result<IOResult<Int>, SystemError> in
                    do throws(SystemError) {
                        return .success(try upstream.write(from: UnsafeRawBufferPointer(rebasing: raw[written...])))
                    } catch {
                        return .failure(error)
                    }
                }
                guard case .processed(let count) = try result.get(), count > 0 else { break }
                written += count
            }
        } catch {
            directionFailed(side: .upstream, error)
            return false
        }
        if written < header.count {
            clientToUpstream.preload(header[written...])
            headerBytesQueued = UInt64(header.count - written)
        }
        return true
    }

    private enum Which {
        case clientToUpstream
        case upstreamToClient
    }

    /// Drives the directions that this socket's event can unblock.
    private func relay(events: UInt32, on side: Side) {
        let readable = events & Self.readableEvents != 0
        let writable = events & (sameport_epollout | sameport_epollhup | sameport_epollerr) != 0
        let from: Which = side == .client ? .clientToUpstream : .upstreamToClient
        let to: Which = side == .client ? .upstreamToClient : .clientToUpstream
        if events & sameport_epollpri != 0 {
            // Urgent data: splice stops at its mark for good, so this direction copies from now on.
            if from == .clientToUpstream { clientToUpstream.leaveSplice() } else { upstreamToClient.leaveSplice() }
        }
        if readable, waitingFor(from) == .read {
            pump(from, edge: Self.readEdge(events))
        }
        if writable, waitingFor(to) == .write { pump(to) }
        // An error on a socket that neither direction is reading or writing now (a reset client
        // while its upstream is quiet) is found here rather than at the next byte.
        if events & sameport_epollerr != 0, case .relaying = state,
           let socket = side == .client ? client : upstream, let error = socket.pendingError() {
            directionFailed(side: side, SystemError("recv", error))
        }
    }

    /// What a direction waits for (read in place: no copy of the direction per event).
    private func waitingFor(_ which: Which) -> Direction.Wait {
        which == .clientToUpstream ? clientToUpstream.waitingFor : upstreamToClient.waitingFor
    }

    private func pump(_ which: Which, edge: Direction.ReadEdge = .unknown) {
        guard case .relaying = state, let upstream else { return }
        let outcome: Direction.Outcome
        let refusal: String?
        switch which {
        case .clientToUpstream:
            outcome = clientToUpstream.pump(
                from: client, to: upstream, edge: edge, closesAtEOF: upstreamToClient.isFinished)
            refusal = clientToUpstream.spliceRefusal
            clientToUpstream.spliceRefusal = nil
        case .upstreamToClient:
            outcome = upstreamToClient.pump(
                from: upstream, to: client, edge: edge, closesAtEOF: clientToUpstream.isFinished)
            refusal = upstreamToClient.spliceRefusal
            upstreamToClient.spliceRefusal = nil
        }
        if let refusal { logSpliceRefusal(refusal) }
        switch outcome {
        case .awaitingRead, .awaitingWrite:
            break
        case .yielded:
            loop.execute { [self] in pump(which) }
        case .finished:
            if clientToUpstream.isFinished, upstreamToClient.isFinished { finish(.completed) }
        case .failed(let side, let error):
            directionFailed(side: side, error)
        }
    }

    private func directionFailed(side: Side, _ error: SystemError) {
        switch error.errno {
        case .connectionReset, .brokenPipe:
            finish(side == .client ? .clientReset : .upstreamReset)
        default:
            finish(.failed(cause: "\(side): \(error)"))
        }
    }

    /// Whether the splice fallback has been logged by this process.
    private static let loggedSpliceUnavailable = Atomic<Bool>(false)

    private func logSpliceRefusal(_ cause: String) {
        // Not worth a line per connection: the first time per process, at debug.
        if !Self.loggedSpliceUnavailable.exchange(true, ordering: .relaxed) {
            context.logger.debug("splice unavailable, copying instead (logged once)", metadata: [
                "relay": .string(context.relayName), "cause": .string(cause)])
        }
    }

    /// The idle deadline: ends the connection if nothing moved for the idle timeout, counting
    /// what the kernel delivered from the send queues; otherwise waits for the new deadline.
    private func checkIdle(now: UInt64) {
        guard let timeout = context.idleTimeout, let upstream else { return }
        let queuedUp = clientToUpstream.noteKernelProgress(to: upstream)
        let queuedDown = upstreamToClient.noteKernelProgress(to: client)
        let previousLook = lastLook
        lastLook = now
        guard let idleDeadline else { return }
        if now >= idleDeadline {
            // Bytes queued in the kernel may be moving: a queue first looked at now, or only just
            // before, cannot show it yet. Look again a quarter of the timeout later (a receiver
            // whose window stays shut is cut at 1.25 times the timeout at most).
            let gap = max(timeout / 4, 1_000_000)
            if queuedUp || queuedDown, previousLook == .max || now &- previousLook < gap {
                return loop.setDeadline(self, at: now &+ gap)
            }
            return finish(.idleTimeout)
        }
        loop.setDeadline(self, at: idleDeadline)
    }

    /// When the connection has been idle for the idle timeout, counting from the last bytes moved
    /// either way; nil without an idle timeout.
    private var idleDeadline: UInt64? {
        context.idleTimeout.map { max(clientToUpstream.lastActivity, upstreamToClient.lastActivity) &+ $0 }
    }

    // MARK: Ending

    /// The egress for log lines: the fixed one, or the address the kernel chose (asked only when a
    /// line is written, while the upstream socket is open).
    private var egressDescription: String {
        // A wildcard egress (upstream "original" on a wildcard listener): the route chose the IP.
        if let fixed = binding.bookedEndpoint, !fixed.address.isUnspecified { return fixed.description }
        return (upstream.flatMap { try? $0.localEndpoint() } ?? nil)?.description ?? binding.description
    }

    private func closeUpstream(reset: Bool) {
        guard let upstream else { return }
        if upstreamRegistration != 0 { loop.forget(id: upstreamRegistration) }
        if reset { upstream.setResetOnClose() }
        upstream.close()
        self.upstream = nil
        upstreamRegistration = 0
    }

    private func closeClient(reset: Bool) {
        if clientRegistration != 0 { loop.forget(id: clientRegistration) }
        clientRegistration = 0
        if reset { client.setResetOnClose() }
        client.close()
    }

    private func finish(_ end: ConnectionEnd) {
        let wasRelaying: Bool
        switch state {
        case .ended: return
        case .relaying: wasRelaying = true
        default: wasRelaying = false
        }
        state = .ended
        loop.cancelDeadline(self)
        let logged = context.logLevel <= ConnectionLog.level(of: end)
        let egress = logged ? egressDescription : ""
        // A reset on one side becomes a reset on the other; a clean end closes with FIN.
        switch end {
        case .clientReset:
            closeClient(reset: false)
            closeUpstream(reset: true)
        case .upstreamReset:
            closeUpstream(reset: false)
            closeClient(reset: true)
        case .failed:
            closeUpstream(reset: true)
            closeClient(reset: true)
        case .completed:
            closeUpstream(reset: false)
            closeClient(reset: false)
        default:
            // Cut short (idle timeout, stop, no upstream): a direction that has not seen its EOF
            // ends with a reset to its receiver, so that a cut stream never looks complete; a
            // client never served (connect failed, stopped while dialling) is reset too.
            closeUpstream(reset: wasRelaying && !clientToUpstream.isFinished)
            closeClient(reset: !wasRelaying || !upstreamToClient.isFinished)
        }
        if logged {
            log(end, egress: egress)
        }
        clientToUpstream.release()
        upstreamToClient.release()
        relay.connectionEnded(self)
    }

    private func log(_ end: ConnectionEnd, egress: String) {
        ConnectionLog(
            relay: context.relayName, client: clientEndpoint.description,
            egress: egress,
            upstream: (connectedAddress >= 0 ? reservation.addresses[Int(connectedAddress)] : nil).map(\.description)
                ?? reservation.addresses.map(\.description).joined(separator: ","),
            bytesToUpstream: clientToUpstream.bytes - min(headerBytesQueued, clientToUpstream.bytes),
            bytesToClient: upstreamToClient.bytes,
            duration: .nanoseconds(Int64(clamping: Monotonic.now &- acceptedAt)), end: end
        ).log(to: context.logger)
    }
}

extension Duration {
    /// The duration as a Dispatch interval, in nanoseconds.
    public var dispatchInterval: DispatchTimeInterval {
        let (seconds, attoseconds) = components
        let (nanoseconds, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        guard !overflow else { return seconds < 0 ? .nanoseconds(0) : .never }
        return .nanoseconds(Int(clamping: nanoseconds.addingReportingOverflow(attoseconds / 1_000_000_000).partialValue))
    }
}
