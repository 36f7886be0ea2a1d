import Dispatch
import Glibc
import Logging
import SamePortCore
import Synchronization

/// One client and its upstream: dials from the egress, then pumps both directions until the end.
///
/// Concurrency model: each connection has its own serial queue (targeting the shared work queue);
/// its two channels, two directions and one timer all deliver there, so the state below needs no
/// lock. The relay's bookkeeping lives on the relay's queue; `onEnd` is how a connection hands
/// its end back to it.
///
/// Dialling: every address of the chosen upstream is tried in order, each attempt bounded by the
/// connect timeout. EADDRNOTAVAIL (the 4-tuple is held: TIME_WAIT, or another process) is retried
/// with backoff, the whole retrying bounded by the connect timeout too. The upstream socket's write
/// source, used to learn that connect() finished, is the same one the pump uses afterwards.
final class Connection: @unchecked Sendable {  // confined to `queue`
    /// What a connection needs from its relay.
    struct Settings: Sendable {
        var relayName: String
        var connectTimeout: Duration
        var idleTimeout: Duration?
        var bufferSize: Int
        /// The pipe size asked for the splice path; nil: read/write only.
        var pipeSize: Int?
        /// The bytes each direction copies before it splices.
        var spliceAfter: UInt64
        var logger: Logger
    }

    private enum State {
        case starting
        case connecting(channel: SocketChannel, address: Int)
        case backingOff
        /// Waiting for the relay to hand over another upstream (bounded by the connect timeout).
        case awaitingUpstream
        case relaying
        case ended
    }

    let queue: DispatchQueue
    /// Called on `queue` once, after the connection ended and its line was logged.
    var onEnd: ((ConnectionEnd) -> Void)?
    /// The relay's answer when a connection asks for another upstream.
    enum Failover: Sendable {
        /// Try this upstream next.
        case reserved(UpstreamSelector.Reservation)
        /// Every upstream has been tried.
        case noneLeft
        /// The relay is stopping.
        case stopping
    }

    /// Called on `queue` when every address of the reserved upstream failed: the relay frees that
    /// reservation and answers once (from any queue) with another upstream not yet tried, as soon
    /// as one is free, or says that none is left.
    var onUpstreamFailed: ((_ tried: Set<Int>, _ answer: @escaping @Sendable (Failover) -> Void) -> Void)?

    private let settings: Settings
    private let client: SocketChannel
    private let clientEndpoint: Endpoint
    private let binding: EgressBinding
    private let acceptedAt: DispatchTime
    private let timer: DispatchSourceTimer
    private var state = State.starting
    private var reservation: UpstreamSelector.Reservation
    private var triedUpstreams: Set<Int>
    private var upstream: SocketChannel?
    private var egressEndpoint: Endpoint?
    private var upstreamEndpoint: Endpoint?
    private var directions: (clientToUpstream: Direction, upstreamToClient: Direction)?
    /// Why each address failed in the current round of attempts.
    private var failures: [String] = []
    private var sawAddressNotAvailable = false
    private var retryDeadline: DispatchTime?
    private var backoff = Backoff()
    private var watchdogInterval = Connection.watchdogFloor
    /// When the connect in progress times out.
    private var connectDeadline = DispatchTime.distantFuture
    private var progressAtLastWatch: UInt64 = 0

    init(
        client: Socket, clientEndpoint: Endpoint, acceptedAt: DispatchTime, binding: EgressBinding,
        reservation: UpstreamSelector.Reservation, settings: Settings, queue: DispatchQueue
    ) {
        self.queue = queue
        self.client = SocketChannel(socket: client, queue: queue)
        self.clientEndpoint = clientEndpoint
        self.acceptedAt = acceptedAt
        self.binding = binding
        self.reservation = reservation
        triedUpstreams = [reservation.upstreamIndex]
        self.settings = settings
        timer = DispatchSource.makeTimerSource(queue: queue)
        timer.setEventHandler { [unowned self] in timerFired() }
        timer.activate()
    }

    /// Starts dialling the upstream, on the connection's queue.
    func start() {
        queue.async { self.attempt(address: 0) }
    }

    /// Ends the connection from outside (the relay is stopping).
    func stop() {
        queue.async { self.finish(.shutdown) }
    }

    // MARK: Dialling

    private func attempt(address index: Int) {
        guard index < reservation.addresses.count else { return roundFailed() }
        let address = reservation.addresses[index]
        let socket: Socket
        do {
            socket = try binding.makeSocket()
        } catch {
            let hint = EgressBinding.hint(for: error.errno).map { " (\($0))" } ?? ""
            return finish(.connectFailed(cause: "egress \(binding): \(error)\(hint)"))
        }
        do {
            // Connected at once or in progress: either way the channel's events conclude it.
            _ = try socket.connect(to: address)
            let channel = SocketChannel(socket: socket, queue: queue)
            state = .connecting(channel: channel, address: index)
            // Readable during connect means it finished too: refused (a hang-up) or data already.
            channel.onWritable = { [unowned self] in concludeConnect(deadlinePassed: false) }
            channel.onReadable = { [unowned self] in concludeConnect(deadlinePassed: false) }
            channel.setWriting(true)
            channel.setReading(true)
            connectDeadline = .now() + settings.connectTimeout.dispatchInterval
            // The connect's own event decides, even when connect() already finished on loopback:
            // concluding before libdispatch has delivered an event on the new channel's sources
            // (suspending or cancelling them right after they were activated) crashed its event
            // loop under churn in CI, twice (swift-corelibs-libdispatch #833, #949). The timer
            // looks at the socket every 250 ms in case that event is lost.
            armConnectTimer()
        } catch {
            socket.close()
            if error.errno == .addressNotAvailable { sawAddressNotAvailable = true }
            failures.append("\(address): \(error)")
            attempt(address: index + 1)
        }
    }

    /// Decides how a connect in progress ended: on its event, at the connect deadline, or when
    /// looked at before either (`unlessInProgress`: if it has not ended, the timer is armed
    /// again). A socket says itself whether it connected or failed, also when its completion
    /// event was lost (see the watchdog). SO_ERROR is read once: reading it clears it.
    private func concludeConnect(deadlinePassed: Bool, unlessInProgress: Bool = false) {
        guard case .connecting(let channel, let index) = state else { return }
        let address = reservation.addresses[index]
        let error = channel.socket.pendingError()
        let connected = error == nil && (try? channel.socket.peerEndpoint()) != nil
        if error == nil && !connected && unlessInProgress && !deadlinePassed {
            return armConnectTimer()
        }
        if error == nil, !deadlinePassed || connected {
            timer.schedule(deadline: .distantFuture)
            return didConnect(channel, address: address)
        }
        channel.close()
        let cause = error.map { "\(SystemError("connect", $0))" }
            ?? "connect timed out after \(settings.connectTimeout.shortDescription)"
        failures.append("\(address): \(cause)")
        attempt(address: index + 1)
    }

    /// Every address of the upstream failed: retry a held 4-tuple, fail over, or give up.
    private func roundFailed() {
        let now = DispatchTime.now()
        if sawAddressNotAvailable {
            let deadline = retryDeadline ?? now + settings.connectTimeout.dispatchInterval
            retryDeadline = deadline
            guard now < deadline else {
                return failDial("the 4-tuple from \(binding) stayed held (TIME_WAIT or another process); add upstreams or use --on-busy ephemeral")
            }
            state = .backingOff
            failures.removeAll()
            sawAddressNotAvailable = false
            timer.schedule(deadline: min(now + backoff.nextDelay().dispatchInterval, deadline), leeway: .milliseconds(1))
            return
        }
        guard let onUpstreamFailed else { return failDial() }
        // Fail over to another upstream: at once if one is free, else when one frees up, within
        // the connect timeout.
        state = .awaitingUpstream
        armTimer(after: settings.connectTimeout)
        onUpstreamFailed(triedUpstreams) { [self] answer in
            queue.async { [self] in
                guard case .awaitingUpstream = state else { return }
                switch answer {
                case .reserved(let next):
                    timer.schedule(deadline: .distantFuture)
                    reservation = next
                    triedUpstreams.insert(next.upstreamIndex)
                    backoff = Backoff()
                    retryDeadline = nil
                    attempt(address: 0)
                case .noneLeft:
                    failDial()
                case .stopping:
                    finish(.shutdown)
                }
            }
        }
    }

    /// Ends a connection that never reached an upstream, naming every cause.
    private func failDial(_ last: String? = nil) {
        finish(.connectFailed(cause: (failures + (last.map { [$0] } ?? [])).joined(separator: "; ")))
    }

    /// The connect timer: at the connect deadline, or at the watchdog's interval before it.
    private func armConnectTimer() {
        timer.schedule(deadline: min(connectDeadline, .now() + Self.watchdogFloor.dispatchInterval), leeway: .milliseconds(10))
    }

    private func armTimer(after duration: Duration) {
        timer.schedule(deadline: .now() + duration.dispatchInterval, leeway: .milliseconds(10))
    }

    private func timerFired() {
        switch state {
        case .connecting:
            // At the deadline, or earlier as a watchdog: the event that says a connect finished
            // can be lost like any other (see `watchdogFloor`), and the socket knows anyway.
            concludeConnect(deadlinePassed: DispatchTime.now() >= connectDeadline, unlessInProgress: true)
        case .backingOff:
            attempt(address: 0)
        case .awaitingUpstream:
            failDial("no other upstream became free within \(settings.connectTimeout.shortDescription)")
        case .relaying:
            timerFiredWhileRelaying()
        case .starting, .ended:
            break
        }
    }

    // MARK: Relaying

    private func didConnect(_ channel: SocketChannel, address: Endpoint) {
        channel.setWriting(false)
        channel.setReading(false)
        state = .relaying
        upstream = channel
        upstreamEndpoint = address
        egressEndpoint = try? channel.socket.localEndpoint()
        settings.logger.debug("connected", metadata: [
            "relay": .string(settings.relayName), "client": .stringConvertible(clientEndpoint),
            "egress": .string(egressEndpoint.map(\.description) ?? "-"), "upstream": .stringConvertible(address)])
        // A relay forwards what it reads as soon as it reads it: Nagle would only add delay.
        for socket in [client.socket, channel.socket] {
            try? socket.setOption(level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1)
        }
        let clientToUpstream = Direction(
            from: client, fromSide: .client, to: channel, capacity: settings.bufferSize,
            pipeSize: settings.pipeSize, spliceAfter: settings.spliceAfter)
        let upstreamToClient = Direction(
            from: channel, fromSide: .upstream, to: client, capacity: settings.bufferSize,
            pipeSize: settings.pipeSize, spliceAfter: settings.spliceAfter)
        directions = (clientToUpstream, upstreamToClient)
        for direction in [clientToUpstream, upstreamToClient] {
            direction.from.onReadable = direction.pump
            direction.to.onWritable = direction.pump
            direction.onEvent = { [unowned self] event in directionEvent(event) }
        }
        scheduleTimer()
        clientToUpstream.pump()
        upstreamToClient.pump()
    }

    private func directionEvent(_ event: Direction.Event) {
        switch event {
        case .finished:
            if let directions, directions.clientToUpstream.isFinished, directions.upstreamToClient.isFinished {
                finish(.completed)
            }
        case .failed(let side, let error):
            switch error.errno {
            case .connectionReset, .brokenPipe:
                finish(side == .client ? .clientReset : .upstreamReset)
            default:
                finish(.failed(cause: "\(side): \(error)"))
            }
        case .spliceUnavailable(let cause):
            // Not worth a line per connection: the first time per process, at debug.
            if !Self.loggedSpliceUnavailable.exchange(true, ordering: .relaxed) {
                settings.logger.debug("splice unavailable, copying instead (logged once)", metadata: [
                    "relay": .string(settings.relayName), "cause": .string(cause)])
            }
        }
    }

    /// Whether the splice fallback has been logged by this process.
    private static let loggedSpliceUnavailable = Atomic<Bool>(false)

    /// Bounds of the stall watchdog's interval: short while bytes move, backing off when idle.
    ///
    /// libdispatch on Linux can lose a read or write event: when one fd's read and write sources
    /// share an epoll registration and the peer hangs up (SR-9033, swift-corelibs-libdispatch #833)
    /// or both directions are busy. Seen here without this watchdog: one connection in a few
    /// hundred of Tests/EndToEndTests/ResourceTests.swift never saw its upstream's EOF, and one
    /// 64 MiB two-way transfer stalled for good. Re-driving both pumps from the connection's timer
    /// turns a lost event into a delay of at most this interval; a pump with nothing to do costs
    /// one read(2) or splice(2) that returns EAGAIN.
    private static let watchdogFloor = Duration.milliseconds(250)
    private static let watchdogCeiling = Duration.seconds(5)

    private func timerFiredWhileRelaying() {
        guard let directions else { return }
        let before = progress(directions)
        for direction in [directions.clientToUpstream, directions.upstreamToClient] where !direction.isFinished {
            direction.pump()
        }
        guard case .relaying = state else { return }
        let after = progress(directions)
        if after != before {
            settings.logger.debug("the watchdog moved bytes: an event was late or lost", metadata: [
                "relay": .string(settings.relayName), "client": .stringConvertible(clientEndpoint)])
        }
        if after == progressAtLastWatch {
            // Idle since the last look: its buffers can go until bytes move again.
            directions.clientToUpstream.releaseIdleBuffer()
            directions.upstreamToClient.releaseIdleBuffer()
        }
        watchdogInterval = after == progressAtLastWatch
            ? min(watchdogInterval * 2, Self.watchdogCeiling) : Self.watchdogFloor
        progressAtLastWatch = after
        scheduleTimer()
    }

    /// Bytes moved plus finished directions: changes whenever a connection makes progress.
    private func progress(_ directions: (clientToUpstream: Direction, upstreamToClient: Direction)) -> UInt64 {
        directions.clientToUpstream.bytes &+ directions.upstreamToClient.bytes
            &+ (directions.clientToUpstream.isFinished ? 1 : 0) &+ (directions.upstreamToClient.isFinished ? 1 : 0)
    }

    /// Arms the connection timer for the idle deadline or the watchdog, whichever comes first.
    private func scheduleTimer() {
        guard case .relaying = state, let directions else { return }
        var deadline = DispatchTime.now() + watchdogInterval.dispatchInterval
        if let idleTimeout = settings.idleTimeout, idleTimeout > .zero {
            directions.clientToUpstream.noteKernelProgress()
            directions.upstreamToClient.noteKernelProgress()
            let last = max(directions.clientToUpstream.lastActivity, directions.upstreamToClient.lastActivity)
            let idleDeadline = DispatchTime(uptimeNanoseconds: last) + idleTimeout.dispatchInterval
            if DispatchTime.now() >= idleDeadline { return finish(.idleTimeout) }
            deadline = min(deadline, idleDeadline)
        }
        timer.schedule(deadline: deadline, leeway: .milliseconds(20))
    }

    // MARK: Ending

    private func finish(_ end: ConnectionEnd) {
        if case .ended = state { return }
        if case .connecting(let channel, _) = state { channel.close() }
        state = .ended
        timer.cancel()
        // A reset on one side becomes a reset on the other; a clean end closes with FIN.
        switch end {
        case .clientReset:
            client.close()
            upstream?.close(reset: true)
        case .upstreamReset:
            upstream?.close()
            client.close(reset: true)
        case .failed:
            upstream?.close(reset: true)
            client.close(reset: true)
        case .completed:
            upstream?.close()
            client.close()
        default:
            // Cut short (idle timeout, stop, no upstream): a direction that has not seen its EOF
            // ends with a reset to its receiver, so that a cut stream never looks complete.
            upstream?.close(reset: directions.map { !$0.clientToUpstream.isFinished } ?? false)
            client.close(reset: directions.map { !$0.upstreamToClient.isFinished } ?? false)
        }
        ConnectionLog(
            relay: settings.relayName, client: clientEndpoint.description,
            egress: egressEndpoint.map(\.description) ?? binding.description,
            upstream: upstreamEndpoint.map(\.description)
                ?? reservation.addresses.map(\.description).joined(separator: ","),
            bytesToUpstream: directions?.clientToUpstream.bytes ?? 0,
            bytesToClient: directions?.upstreamToClient.bytes ?? 0,
            duration: acceptedAt.elapsed, end: end
        ).log(to: settings.logger)
        directions?.clientToUpstream.onEvent = nil
        directions?.upstreamToClient.onEvent = nil
        // The pipes hold no Dispatch source: they close at once.
        directions?.clientToUpstream.releasePipe()
        directions?.upstreamToClient.releasePipe()
        onUpstreamFailed = nil
        onEnd?(end)
        onEnd = nil
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

extension DispatchTime {
    /// The time since this instant.
    var elapsed: Duration {
        .nanoseconds(Int64(clamping: DispatchTime.now().uptimeNanoseconds &- uptimeNanoseconds))
    }
}
