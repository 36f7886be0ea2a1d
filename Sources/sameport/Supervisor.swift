import CSamePortShims
import Dispatch
import Glibc
import Logging
import SamePortCore
import SamePortNet
import SamePortSystemd

/// The running relays and what the service manager hears about them: signals, reload (SIGHUP),
/// drain (SIGTERM), status and watchdog.
///
/// Concurrency: confined to the main queue, where the signal pipe's source and the timers deliver.
final class Supervisor: @unchecked Sendable {  // confined to the main queue
    /// The relays of the current configuration, in its order.
    private var relays: [Relay]
    /// Relays a reload removed (or moved to another address), draining their connections.
    private var retiring: [ObjectIdentifier: Relay] = [:]
    private var upstreamLists: [ObjectIdentifier: [[Endpoint]]] = [:]
    private let configPath: String?
    private let reloadTimeout: Duration
    /// The file's `threads` key as last read (at start-up or by a good reload).
    private var threadsKey: Int?
    private let notifier: Notifier
    private let logger: Logger
    private var sources: [DispatchSourceProtocol] = []
    private var isStopping = false
    private var isCutting = false
    private var isReloading = false
    /// Reads of the file (with its host names) that have not returned. One may outlive its reload
    /// (a hung file system or resolver): later reloads read on other threads, up to
    /// `maxReadsInFlight` blocked at once.
    private var readsInFlight = 0
    private static let maxReadsInFlight = 4
    /// The number of the last read started: a read's result belongs to the reload that started
    /// it, and only while that reload runs.
    private var readNumber = 0
    /// Fails the running reload when its read takes longer than the reload timeout; cancelled
    /// when the reload ends. A timer source, not `asyncAfter`: libdispatch keeps a cancelled
    /// work item's timer, block and group until the deadline passes, about 1 KB a reload for the
    /// whole reload timeout; a cancelled source is freed at once.
    private var reloadDeadline: DispatchSourceTimer?
    /// A SIGHUP came during a reload: reload once more when it is done.
    private var reloadAgain = false
    /// Clients served by relays that have retired, so that the total never goes down.
    private var servedByRetired = 0
    /// Said in front of the counts until the next good reload: why the last one failed.
    private var statusNote: String?
    /// The last STATUS= sent, and when (uptime ns): at most one a second, whatever sends it.
    private var lastStatus = ""
    private var lastStatusAt: UInt64?

    init(
        relays: [(relay: Relay, upstreams: [[Endpoint]])], configPath: String?, reloadTimeout: Duration, threadsKey: Int?,
        notifier: Notifier, logger: Logger
    ) {
        self.relays = relays.map(\.relay)
        for (relay, upstreams) in relays { upstreamLists[ObjectIdentifier(relay)] = upstreams }
        self.configPath = configPath
        self.reloadTimeout = reloadTimeout
        self.threadsKey = threadsKey
        self.notifier = notifier
        self.logger = logger
    }

    // MARK: Start

    /// Takes SIGTERM, SIGINT and SIGHUP from now on: each is handled on the main queue once it
    /// runs, however early it came (see `sameport_signal_pipe`).
    func installSignalHandlers() throws(StartFailure) {
        let signals = [SIGTERM, SIGINT, SIGHUP]
        let fd = signals.withUnsafeBufferPointer { sameport_signal_pipe($0.baseAddress, Int32($0.count)) }
        guard fd >= 0 else {
            throw StartFailure(messages: ["runtime failure: cannot set up signal handling: \(String(cString: strerror(errno))); try again"], exitCode: 1, errno: errno)
        }
        let source = DispatchSource.makeReadSource(fileDescriptor: fd, queue: .main)
        source.setEventHandler { [unowned self] in
            var numbers = [UInt8](repeating: 0, count: 64)
            while true {
                let count = read(fd, &numbers, numbers.count)
                if count < 0 && errno == EINTR { continue }
                guard count > 0 else { return }  // EAGAIN: every signal so far is handled
                for number in numbers[..<count] { handle(Int32(number)) }
            }
        }
        source.activate()
        sources.append(source)
    }

    private func handle(_ signal: Int32) {
        switch signal {
        case SIGTERM: stop(on: "SIGTERM", cut: false)
        case SIGINT: stop(on: "SIGINT", cut: true)
        case SIGHUP: reload()
        default: break
        }
    }

    /// Starts a relay's accepting and logs where it listens.
    func start(_ relay: Relay) {
        let spec = relay.spec
        relay.onFatalError = { [logger, notifier] message, code in
            logger.critical("\(message)")
            notifier.failed(errno: code, status: message)
            exit(1)
        }
        relay.startAccepting()
        let upstreams = upstreamLists[ObjectIdentifier(relay)] ?? []
        let upstreamList = spec.forwardsToOriginal ? "original destinations (\(spec.destinations))" : zip(spec.upstreams, upstreams).map { name, addresses in
            addresses.count == 1 && name.endpoint != nil
                ? "\(name)" : "\(name) (\(addresses.map(\.description).joined(separator: ", ")))"
        }.joined(separator: ", ")
        let listen = relay.listenDescription
        // relay and listen as keys too, for whoever reads the JSON lines by key.
        var metadata: Logger.Metadata = [
            "relay": .string(spec.name), "listen": .string(listen),
            "egress": .string("\(spec.egress)"), "on_busy": .string(spec.onBusy.rawValue)]
        if spec.transparent { metadata["transparent"] = "true" }
        if relay.isInherited { metadata["socket"] = "systemd" }
        logger.info("relay \(spec.name) listening on \(listen) -> \(upstreamList)", metadata: metadata)
    }

    /// Every relay accepts: READY=1, then the status line and the watchdog keep going.
    func ready() {
        notifier.ready(status: dueStatus(statusText()))
        guard notifier.isEnabled else { return }
        // Looks 4 times a second; sends at most once a second (`dueStatus`).
        sources.append(repeating(every: .milliseconds(250)) { $0.updateStatus() })
        if let interval = Notifier.watchdogInterval() {
            // Half the interval, as sd_watchdog_enabled(3) advises; never a busy loop, whatever
            // WATCHDOG_USEC says (1 would make it a 500 ns timer).
            let ping = max(interval / 2, .milliseconds(10))
            logger.info("watchdog: pinging systemd every \(ping.shortDescription)")
            sources.append(repeating(every: ping) { $0.pingWatchdog() })
        }
    }

    // MARK: Status and watchdog

    private func statusText() -> String {
        var open = 0, queued = 0, served = servedByRetired, draining = 0
        for relay in relays {
            let counts = relay.counts()
            open += counts.open
            queued += counts.queued
            served += counts.served
        }
        for relay in retiring.values {
            let counts = relay.counts()
            draining += counts.open
            served += counts.served
        }
        var text = "\(relays.count) relay\(relays.count == 1 ? "" : "s"), \(open) open connection\(open == 1 ? "" : "s"), \(queued) queued, \(served) served"
        if draining > 0 { text += ", \(draining) draining from removed relays" }
        if isStopping {
            text = "stopping: " + text
        } else if isReloading {
            text = "reloading: " + text
        }
        if let statusNote { text = statusNote + "; " + text }
        return text
    }

    /// Sends the status line if it changed and a second has passed since the last.
    private func updateStatus() {
        let text = statusText()
        guard text != lastStatus, let due = dueStatus(text) else { return }
        notifier.status(due)
    }

    /// `text`, taken as sent, when a second has passed since the last STATUS=; otherwise nil, and
    /// the status timer sends the news once it is due.
    private func dueStatus(_ text: String) -> String? {
        let now = DispatchTime.now().uptimeNanoseconds
        if let lastStatusAt, now - lastStatusAt < 1_000_000_000 { return nil }
        lastStatusAt = now
        lastStatus = text
        return text
    }

    /// WATCHDOG=1 goes out only after a task has gone through every shard's loop in turn, where
    /// all the relays' accepting and pumping runs: a stuck shard stops the pings, and systemd
    /// restarts the service.
    private func pingWatchdog() {
        guard let group = try? EventLoopGroup.shared() else { return }
        group.hopThroughEveryShard { [notifier] in notifier.watchdog() }
    }

    // MARK: Stop

    /// SIGTERM: stop accepting and let open connections finish for up to each relay's drain
    /// timeout. SIGINT, or a second SIGTERM: cut them now.
    private func stop(on signal: String, cut: Bool) {
        let all = relays + retiring.values
        let counts = all.map { $0.counts() }
        let open = counts.reduce(0) { $0 + $1.open }
        if isStopping {
            guard !isCutting else { return }
            isCutting = true
            logger.notice("\(signal) while draining: cutting \(open) open connection\(open == 1 ? "" : "s") now")
            for relay in all { relay.drain(timeout: .zero) {} }
            exitLater(after: .seconds(5))
            return
        }
        isStopping = true
        isCutting = cut
        let longest = all.map(\.spec.drainTimeout).max() ?? .zero
        if cut || open == 0 || longest == .zero {
            logger.info("stopping on \(signal)")
        } else {
            // Queued clients are served as the open connections free their pairs, within the drain.
            let queued = counts.reduce(0) { $0 + $1.queued }
            let waiting = queued == 0 ? "" : " and \(queued) queued client\(queued == 1 ? "" : "s")"
            logger.info("stopping on \(signal): draining \(open) open connection\(open == 1 ? "" : "s")\(waiting) for up to \(longest.shortDescription) (SIGINT or a second SIGTERM cuts them)")
        }
        notifier.stopping(status: dueStatus(statusText()))
        let group = DispatchGroup()
        for relay in all {
            group.enter()
            relay.drain(timeout: cut ? .zero : relay.spec.drainTimeout) { group.leave() }
        }
        group.notify(queue: .main) { [logger] in
            logger.info("stopped")
            exit(0)
        }
        // Every connection is cut by then; should one hang, do not hang with it.
        exitLater(after: (cut ? .zero : longest) + .seconds(5))
    }

    private func exitLater(after delay: Duration) {
        DispatchQueue.main.asyncAfter(deadline: .now() + delay.dispatchInterval) { [logger] in
            logger.warning("stopped with connections still closing")
            exit(0)
        }
    }

    // MARK: Reload

    /// A new configuration, read and resolved off the main queue.
    private typealias Prepared = [(spec: RelaySpec, upstreams: [[Endpoint]])]

    /// SIGHUP: re-reads the configuration file and applies it without dropping open connections;
    /// a bad file leaves the running configuration as it is.
    private func reload() {
        guard !isStopping else {
            logger.notice("SIGHUP while stopping: not reloading")
            return
        }
        guard !isReloading else {
            reloadAgain = true
            logger.notice("SIGHUP during a reload: reloading again once it is done")
            return
        }
        // No STATUS= here: the one-a-second slot is kept for the READY=1 that ends the reload
        // (with its outcome); a reload that takes longer shows "reloading: " through the timer.
        notifier.reloading()
        guard let configPath, configPath != "-" else {
            logger.notice("SIGHUP: nothing to reload: the relay was \(configPath == nil ? "configured on the command line" : "read from standard input"); still serving")
            finishReload()
            return
        }
        logger.notice("SIGHUP: reloading \(configPath)")
        isReloading = true
        // A stuck read must not stop every later reload (the file may be fixed, or a host name
        // removed), but each blocks a worker thread, which the connections need: a few at most.
        guard readsInFlight < Self.maxReadsInFlight else {
            finishReload(failedWith: ["\(readsInFlight) earlier reloads are still reading \(configPath) or resolving its host names: check the file's file system and the resolver, then send SIGHUP again"])
            return
        }
        readsInFlight += 1
        readNumber += 1
        let number = readNumber
        // Reading the file and resolving host names can block for seconds (or for good: a hung
        // file system): not on the main queue, where signals, the status line and the watchdog
        // are served; and not for longer than the reload timeout.
        DispatchQueue.global().async { [self] in
            let prepared = Self.prepared(configPath)
            DispatchQueue.main.async { [self] in
                readsInFlight -= 1
                // A read that outlived its reload (timed out) is dropped, even while a later
                // reload runs.
                guard isReloading, number == readNumber else {
                    let advice = number == readNumber ? ": send SIGHUP again" : " (a later reload has read the file since)"
                    logger.notice("the reload that timed out has read \(configPath) at last; its result is dropped\(advice)")
                    return
                }
                guard !isStopping else {
                    reloadDeadline?.cancel()
                    reloadDeadline = nil
                    isReloading = false
                    return
                }
                do throws(StartFailure) {
                    let reading = try prepared.get()
                    let summary = try apply(reading.relays)
                    statusNote = nil
                    logger.notice("reloaded \(configPath): \(summary)")
                    noteThreadsKey(reading.threads, in: configPath)
                    let running = relays.map { ($0, upstreamLists[ObjectIdentifier($0)] ?? []) }
                    for line in Daemon.sharedPairWarnings(running) { logger.warning("\(line)") }
                    finishReload()
                } catch {
                    finishReload(failedWith: error.details + error.messages)
                }
            }
        }
        let deadline = DispatchSource.makeTimerSource(queue: .main)
        deadline.setEventHandler { [unowned self] in
            guard !isStopping else { return }
            finishReload(failedWith: ["reading \(configPath) and resolving its host names took longer than \(reloadTimeout.shortDescription): check the file's file system and the resolver, or raise --reload-timeout"])
        }
        deadline.schedule(deadline: .now() + reloadTimeout.dispatchInterval)
        deadline.activate()
        reloadDeadline = deadline
    }

    /// Ends a reload: READY=1, then the reload a SIGHUP asked for meanwhile. A failed one is logged
    /// line by line and said in STATUS= until a reload succeeds.
    private func finishReload(failedWith problems: [String] = []) {
        reloadDeadline?.cancel()
        reloadDeadline = nil
        isReloading = false
        if let first = problems.first {
            for line in problems {
                logger.error("reload failed, still running the previous configuration: \(line)")
            }
            let more = problems.count - 1
            statusNote = "reload failed (\(first)\(more > 0 ? "; \(more) more in the log" : "")), running the previous configuration"
        }
        notifier.ready(status: dueStatus(statusText()))
        if reloadAgain {
            reloadAgain = false
            reload()
        }
    }

    /// A reload that changes the `threads` key: said once per change, since the event loops are
    /// made at start-up and a reload keeps them.
    private func noteThreadsKey(_ key: Int?, in path: String) {
        guard key != threadsKey else { return }
        let name = { (key: Int?) in key.map { "threads = \($0)" } ?? "no threads key (one event loop per CPU)" }
        let running = (try? EventLoopGroup.shared().count).map { " (\($0) running)" } ?? ""
        logger.notice("\(path) changed \(name(threadsKey)) to \(name(key)): event loops are made at start-up\(running), so restart sameport to apply it (--threads on the command line, if given, overrides the key)")
        threadsKey = key
    }

    private static func prepared(_ path: String) -> Result<Reading, StartFailure> {
        do {
            return .success(try prepare(path))
        } catch {
            return .failure(error)
        }
    }

    /// The file's relays with their upstreams resolved, and its `threads` key.
    private struct Reading {
        var relays: Prepared
        var threads: Int?
    }

    /// The file's relays with their upstreams resolved (every failure listed), and its `threads`.
    private static func prepare(_ path: String) throws(StartFailure) -> Reading {
        let configuration = try ConfigFile.loadConfiguration(path)
        var prepared: Prepared = []
        var failures: [String] = []
        for spec in configuration.relays {
            do {
                prepared.append((spec, try Daemon.resolve(spec)))
            } catch {
                failures.append("relay \(spec.name): \(error.message)")
            }
        }
        guard failures.isEmpty else { throw StartFailure(messages: failures, exitCode: 2) }
        return Reading(relays: prepared, threads: configuration.threads)
    }

    /// Opens the relays the new specs add and checks the settings of the kept ones, then (all or
    /// nothing) starts the new, applies the changed and retires the removed. Returns what changed.
    private func apply(_ prepared: Prepared) throws(StartFailure) -> String {
        let current = Dictionary(relays.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        var failures: [String] = []
        // A socket from systemd stays open in PID 1 whatever sameport does: a relay that gave it
        // up would leave clients queued on a socket nobody accepts from.
        let names = Set(prepared.map(\.spec.name))
        for relay in relays where relay.isInherited && !names.contains(relay.name) {
            failures.append("relay \(relay.name) takes its socket from systemd, so a reload cannot remove or rename it: keep the relay, or change the .socket unit and restart the service")
        }
        // A relay is kept when its name stays and its listener can: same address (and the same
        // IP_TRANSPARENT, set only when it binds), or systemd's.
        func keeps(_ relay: Relay, _ spec: RelaySpec) -> Bool {
            relay.isInherited || (relay.spec.listen == spec.listen && relay.spec.transparent == spec.transparent)
        }
        let keptIDs = Set(prepared.compactMap { item in current[item.spec.name].flatMap { keeps($0, item.spec) ? ObjectIdentifier($0) : nil } })
        // Relays retired by an earlier reload closed their listeners: only this reload's count.
        let leaving = relays.filter { !keptIDs.contains(ObjectIdentifier($0)) }
        var kept: [(relay: Relay, spec: RelaySpec, upstreams: [[Endpoint]])] = []
        var added: [Relay] = []
        var next: [Relay] = []
        for (spec, upstreams) in prepared {
            if let relay = current[spec.name], keeps(relay, spec) {
                do {
                    try relay.check(spec: spec, upstreams: upstreams)
                    kept.append((relay, spec, upstreams))
                    next.append(relay)
                } catch {
                    failures.append("relay \(spec.name): \(error.message)")
                }
                continue
            }
            let relay = Relay(spec: spec, upstreams: upstreams, logger: logger)
            // Only a relay of ours that is going away may hold the new address: the new listener
            // binds beside it (SO_REUSEPORT) until it closes. Anyone else's is refused as at start.
            let shared = leaving.contains { $0.listenEndpoint.map(spec.listen.overlaps) ?? false }
            do {
                try relay.open(sharedWithOwnRelay: shared)
                upstreamLists[ObjectIdentifier(relay)] = upstreams
                added.append(relay)
                next.append(relay)
            } catch {
                failures.append("relay \(spec.name): cannot start: \(error.message)")
            }
        }
        guard failures.isEmpty else {
            for relay in added {
                relay.close()
                upstreamLists[ObjectIdentifier(relay)] = nil
            }
            throw StartFailure(messages: failures, exitCode: 2)
        }
        var changed: [String] = []
        for (relay, spec, upstreams) in kept where relay.spec != spec || upstreamLists[ObjectIdentifier(relay)] != upstreams {
            if relay.isInherited && relay.spec.listen != spec.listen {
                logger.warning("listen changed to \(spec.listen), but the relay takes its socket from systemd: it stays on \(relay.listenEndpoint.map(\.description) ?? "its socket"); change ListenStream= and restart the service to move it", metadata: ["relay": .string(spec.name)])
            }
            relay.reconfigure(spec: spec, upstreams: upstreams)
            upstreamLists[ObjectIdentifier(relay)] = upstreams
            changed.append(spec.name)
        }
        let nextIDs = Set(next.map(ObjectIdentifier.init))
        let removed = relays.filter { !nextIDs.contains(ObjectIdentifier($0)) }
        for relay in removed { retire(relay) }
        relays = next
        for relay in added { start(relay) }
        let unchanged = kept.count - changed.count
        func list(_ names: [String]) -> String { names.isEmpty ? "none" : names.joined(separator: ", ") }
        // A relay whose listen address changed is a new relay beside the old one, which drains:
        // said as a move, not as one relay added and another removed.
        let moves = added.compactMap { new in removed.first { $0.name == new.name }.map { (old: $0, new: new) } }
        let moved = Set(moves.map(\.new.name))
        var summary = "\(relays.count) relay\(relays.count == 1 ? "" : "s"); added: \(list(added.map(\.name).filter { !moved.contains($0) })); removed: \(list(removed.map(\.name).filter { !moved.contains($0) })); changed: \(list(changed)); unchanged: \(unchanged)"
        if !moves.isEmpty { summary += "; moved: \(list(moves.map { "\($0.new.name) (\($0.old.listenDescription) to \($0.new.listenDescription))" }))" }
        return summary
    }

    /// Stops a relay a reload removed: no new clients; its open connections finish (up to its
    /// drain timeout) on the settings they started with.
    private func retire(_ relay: Relay) {
        let id = ObjectIdentifier(relay)
        retiring[id] = relay
        let open = relay.counts().open
        logger.notice("relay \(relay.name) on \(relay.listenEndpoint.map(\.description) ?? "-") stops accepting: \(open) open connection\(open == 1 ? "" : "s") may finish for up to \(relay.spec.drainTimeout.shortDescription)", metadata: ["relay": .string(relay.name)])
        relay.drain(timeout: relay.spec.drainTimeout) {
            DispatchQueue.main.async { [self] in
                retiring[id] = nil
                upstreamLists[id] = nil
                servedByRetired += relay.counts().served
                logger.info("relay \(relay.name) retired: it has no connection left", metadata: ["relay": .string(relay.name)])
            }
        }
    }

    // MARK: Sources

    private func repeating(every interval: Duration, _ handler: @escaping @Sendable (Supervisor) -> Void) -> DispatchSourceTimer {
        let timer = DispatchSource.makeTimerSource(queue: .main)
        timer.setEventHandler { [unowned self] in handler(self) }
        timer.schedule(deadline: .now() + interval.dispatchInterval, repeating: interval.dispatchInterval, leeway: .milliseconds(10))
        timer.activate()
        return timer
    }
}
