import Dispatch
import Glibc
import Logging
import SamePortCore
import SamePortNet
import SamePortSystemd

/// The daemon's lifetime: take the sockets systemd passed, resolve, bind, serve until a signal,
/// reload on SIGHUP, drain on SIGTERM.
struct Daemon {
    var relays: [RelaySpec]
    /// Where the relays came from: the file's path, or nil for command-line flags.
    var configPath: String?
    var log: (level: Logger.Level, format: LogFormat)
    /// How long a reload may take to read the file and resolve its host names.
    var reloadTimeout = Daemon.defaultReloadTimeout
    /// The file's `threads` key at start-up (nil: not given): a reload that changes it is told
    /// that the event loops are made at start-up.
    var threadsKey: Int?

    static let defaultReloadTimeout = Duration.seconds(60)

    /// Starts every relay and never returns: the process exits from a signal or a fatal error.
    /// Either every relay starts or none does: every failure is listed, and the process exits.
    func run() throws -> Never {
        let format = log.format
        let level = log.level
        let journal = Journal.isStderrJournal
        LoggingSystem.bootstrap { _ in StderrLogHandler(logLevel: level, format: format, journal: journal) }
        let logger = Logger(label: "sameport")
        let notifier = Notifier()
        ProcessLimits.ignoreSIGPIPE()
        ProcessLimits.raiseOpenFileLimit()

        let opened = try open(logger: logger)
        // CAP_CHOWN was only for taking over passed sockets: give it up before Dispatch starts
        // threads (capabilities belong to each thread).
        Self.dropStartupCapabilities(afterTakeOver: opened.contains { $0.relay.tookOverSocket }, logger: logger)

        let supervisor = Supervisor(
            relays: opened, configPath: configPath, reloadTimeout: reloadTimeout, threadsKey: threadsKey,
            notifier: notifier, logger: logger)
        for line in Self.sharedPairWarnings(opened) { logger.warning("\(line)") }
        try supervisor.installSignalHandlers()
        // Signals are handled before the first client is taken.
        for (relay, _) in opened {
            supervisor.start(relay)
        }
        supervisor.ready()
        dispatchMain()
    }

    /// Matches the sockets systemd passed to relays, then resolves and opens every relay; all or
    /// none.
    private func open(logger: Logger) throws(StartFailure) -> [(relay: Relay, upstreams: [[Endpoint]])] {
        let passed: [PassedSocket]
        do {
            passed = try Activation.passedSockets { logger.warning("\($0)") }
        } catch {
            throw StartFailure(message: "cannot start: \(error.message)", exitCode: 2)
        }
        let assignment = SocketAssignment(passed: passed, relays: relays.map(\.name))
        var failures: [(message: String, isTemporary: Bool, errno: Int32?)] = assignment.problems.map { ("cannot start: \($0)", false, EINVAL) }
        for socket in passed where !socket.isListeningStream {
            failures.append(("cannot start: \(socket.label) from systemd is not a listening TCP socket: give its .socket unit ListenStream=IP:PORT (not a path, ListenDatagram= or Accept=yes)", false, EINVAL))
        }
        guard failures.isEmpty else {
            throw StartFailure(messages: failures.map(\.message), exitCode: 2, errno: failures.first?.errno)
        }
        if passed.count == 1, relays.count == 1, let socket = passed.first, let name = socket.name, name != relays[0].name {
            logger.notice("\(socket.label) from systemd goes to the only relay, \(relays[0].name), whatever its name", metadata: ["relay": .string(relays[0].name)])
        }
        if !passed.isEmpty {
            for spec in relays where assignment.sockets[spec.name] == nil {
                logger.notice("no socket from systemd is named \(spec.name): the relay binds \(spec.listen) itself", metadata: ["relay": .string(spec.name)])
            }
        }
        // Every relay is tried, so that one run lists every failure; then all start, or none.
        let label: (RelaySpec) -> String = { configPath == nil ? "" : "relay \($0.name): " }
        var opened: [(relay: Relay, upstreams: [[Endpoint]])] = []
        // Relays that bind their own address and found it in use: a socket systemd passed to
        // another relay may hold it.
        var addressInUse: [(failure: Int, spec: RelaySpec)] = []
        for spec in relays {
            let upstreams: [[Endpoint]]
            do {
                upstreams = try Self.resolve(spec)
            } catch {
                let kind = error.isTemporary ? "runtime failure" : "configuration error"
                failures.append(("\(kind): \(label(spec))\(error.message)", error.isTemporary, error.errno ?? EINVAL))
                continue
            }
            let relay = Relay(spec: spec, upstreams: upstreams, logger: logger)
            do {
                try relay.open(inherited: assignment.sockets[spec.name].map(Self.inherited))
                opened.append((relay, upstreams))
            } catch {
                if error.errno == EADDRINUSE, assignment.sockets[spec.name] == nil {
                    addressInUse.append((failures.count, spec))
                }
                failures.append(("cannot start: \(label(spec))\(error.message)", false, error.errno ?? EINVAL))
            }
        }
        for (index, spec) in addressInUse {
            guard let holder = opened.first(where: { $0.relay.isInherited && ($0.relay.listenEndpoint.map(spec.listen.overlaps) ?? false) })?.relay,
                  let socket = assignment.sockets[holder.name] else { continue }
            failures[index].message = "cannot start: \(label(spec))cannot listen on \(spec.listen): \(socket.label) from systemd, which relay \(holder.name) serves, is bound there: make each relay's listen the ListenStream= of its own socket"
        }
        guard failures.isEmpty else {
            for (relay, _) in opened { relay.close() }
            throw StartFailure(
                messages: failures.map(\.message),
                exitCode: failures.allSatisfy(\.isTemporary) ? 1 : 2, errno: failures.first?.errno)
        }
        return opened
    }

    static func resolve(_ spec: RelaySpec) throws(StartupError) -> [[Endpoint]] {
        try spec.upstreams.map { upstream throws(StartupError) in try Resolver.resolve(upstream) }
    }

    private static func inherited(_ socket: PassedSocket) -> Relay.InheritedSocket {
        Relay.InheritedSocket(fd: socket.fd, label: socket.label) { Capabilities.raise(.chown) }
    }

    /// Drops CAP_CHOWN (and CAP_SETPCAP, which only served to drop it from the bounding set):
    /// nothing after start-up needs them, and a relay should not keep the power to change owners.
    /// Said at info after a socket take-over, at debug otherwise (root drops them on every start).
    private static func dropStartupCapabilities(afterTakeOver tookOver: Bool, logger: Logger) {
        let level: Logger.Level = tookOver ? .info : .debug
        let report = Capabilities.dropWithSetpcap(.chown)
        guard report.held else { return }
        // Capabilities belong to each thread: any thread started before this point keeps them.
        if let threads = Capabilities.threadCount(), threads > 1 {
            logger.warning("dropped CAP_CHOWN on the main thread, but \(threads - 1) other thread\(threads == 2 ? "" : "s") started earlier may keep it")
        }
        if let problem = report.problem {
            logger.warning("could not drop CAP_CHOWN: \(problem)")
        } else if report.droppedFromBoundingSet {
            logger.log(level: level, "dropped CAP_CHOWN from every capability set")
        } else {
            logger.log(level: level, "dropped CAP_CHOWN from the effective, permitted, inheritable and ambient sets (the bounding set keeps it without CAP_SETPCAP; with NoNewPrivileges=yes it cannot come back)")
        }
    }
}

/// Which relay gets which socket systemd passed: by name, or directly for one socket and one
/// relay. A relay without a socket binds its own listen address.
struct SocketAssignment {
    var sockets: [String: PassedSocket] = [:]
    /// Why the sockets cannot be matched, one line each.
    var problems: [String] = []

    init(passed: [PassedSocket], relays: [String]) {
        if passed.count == 1, relays.count == 1, let relay = relays.first, let socket = passed.first {
            sockets[relay] = socket
            return
        }
        var byName: [String: [PassedSocket]] = [:]
        for socket in passed {
            guard let name = socket.name else {
                problems.append("\(socket.label) from systemd has no name, and with several sockets or relays each socket is matched to the relay of its name: set FileDescriptorName= in its .socket unit")
                continue
            }
            byName[name, default: []].append(socket)
        }
        for (name, sockets) in byName.sorted(by: { $0.key < $1.key }) {
            if sockets.count > 1 {
                problems.append("\(sockets.map { "socket \($0.fd)" }.joined(separator: " and ")) from systemd are all named \"\(name)\", and a relay takes one socket: give each its own FileDescriptorName= and a relay of that name")
            } else if let socket = sockets.first {
                if relays.contains(name) {
                    self.sockets[name] = socket
                } else {
                    problems.append("\(socket.label) from systemd has no relay named \"\(name)\" (relays: \(relays.joined(separator: ", "))): name a relay \"\(name)\", or set FileDescriptorName= to a relay's name")
                }
            }
        }
    }
}

extension Daemon {
    /// Relays that dial one upstream address from one fixed source ip:port (same-port egress on
    /// one listen address, or one `egress` ip:port): each books the pair for itself only, so while
    /// one holds it, a client of the other meets EADDRNOTAVAIL until the holder ends or its connect
    /// timeout passes. One line for each such two relays, at start-up and after each reload.
    static func sharedPairWarnings(_ relays: [(relay: Relay, upstreams: [[Endpoint]])]) -> [String] {
        func source(_ relay: Relay) -> Endpoint? {
            switch relay.spec.egress {
            case .fixed(let endpoint):
                return endpoint.port == 0 ? nil : endpoint.unmapped
            case .samePort:
                guard let listen = relay.listenEndpoint, !listen.address.isUnspecified else { return nil }
                return listen.unmapped
            case .ephemeral, .client, .clientIP:
                return nil
            }
        }
        var lines: [String] = []
        for (index, first) in relays.enumerated() {
            guard let from = source(first.relay) else { continue }
            let dialled = Set(first.upstreams.joined().map(\.unmapped))
            for second in relays[(index + 1)...] where source(second.relay) == from {
                guard let upstream = second.upstreams.joined().map(\.unmapped).first(where: dialled.contains) else { continue }
                lines.append("relays \(first.relay.name) and \(second.relay.name) both dial \(upstream) from \(from), and each books that pair for itself: while one holds it, a client of the other fails to connect (EADDRNOTAVAIL) until it is free or the connect timeout passes; give the two relays different egress ports or different upstreams")
            }
        }
        return lines
    }
}
