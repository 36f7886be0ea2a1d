import Dispatch
import Glibc
import Logging
import SamePortCore
import SamePortNet

/// The daemon's lifetime: resolve, bind, serve until a signal, stop.
struct Daemon {
    var relays: [RelaySpec]
    /// Where the relays came from: the file's path, or nil for command-line flags.
    var configPath: String?
    var log: (level: Logger.Level, format: LogFormat)

    /// Starts every relay and never returns: the process exits from a signal or a fatal error.
    /// Either every relay starts or none does: every failure is listed, and the process exits.
    func run() throws -> Never {
        let format = log.format
        let level = log.level
        LoggingSystem.bootstrap { _ in StderrLogHandler(logLevel: level, format: format) }
        let logger = Logger(label: "sameport")
        ProcessLimits.ignoreSIGPIPE()
        ProcessLimits.raiseOpenFileLimit()

        // From a file, every message names its relay; from flags there is only the one.
        let label: (RelaySpec) -> String = { configPath == nil ? "" : "relay \($0.name): " }
        var failures: [(message: String, isTemporary: Bool)] = []
        var opened: [(relay: Relay, upstreams: [[Endpoint]])] = []
        // Every relay is tried, so that one run lists every failure; then all start, or none.
        for spec in relays {
            let upstreams: [[Endpoint]]
            do {
                upstreams = try spec.upstreams.map { upstream throws(StartupError) in try Resolver.resolve(upstream) }
            } catch {
                let kind = error.isTemporary ? "runtime failure" : "configuration error"
                failures.append(("\(kind): \(label(spec))\(error.message)", error.isTemporary))
                continue
            }
            let relay = Relay(spec: spec, upstreams: upstreams, logger: logger)
            do {
                try relay.open()
                opened.append((relay, upstreams))
            } catch {
                failures.append(("cannot start: \(label(spec))\(error.message)", false))
            }
        }
        guard failures.isEmpty else {
            for (relay, _) in opened { relay.close() }
            throw StartFailure(
                messages: failures.map(\.message),
                exitCode: failures.allSatisfy(\.isTemporary) ? 1 : 2)
        }
        let group = RelayGroup(relays: opened.map(\.relay))

        let stop: @Sendable (String) -> Void = { name in
            logger.info("stopping on \(name)")
            group.stop {
                logger.info("stopped")
                exit(0)
            }
            // Every connection is closed by stop(); should one hang, do not hang with it.
            DispatchQueue.main.asyncAfter(deadline: .now() + .seconds(5)) { exit(0) }
        }
        let sources = [
            Self.onSignal(SIGTERM, "SIGTERM", stop), Self.onSignal(SIGINT, "SIGINT", stop),
            // SIGHUP would end the process by default. Reloading the file comes with the systemd
            // integration; until then, say so and keep serving.
            Self.onSignal(SIGHUP, "SIGHUP") { _ in
                if configPath == nil {
                    logger.notice("SIGHUP: nothing to reload for a relay configured on the command line; still serving")
                } else {
                    logger.notice("SIGHUP: reloading the configuration file is not supported yet; restart to apply changes; still serving")
                }
            },
        ]
        // Signals are handled before the first client is taken.
        for (relay, upstreams) in opened {
            let spec = relay.spec
            relay.onFatalError = { message in
                logger.critical("\(message)")
                exit(1)
            }
            relay.startAccepting()
            let upstreamList = zip(spec.upstreams, upstreams).map { name, addresses in
                addresses.count == 1 && name.endpoint != nil
                    ? "\(name)" : "\(name) (\(addresses.map(\.description).joined(separator: ", ")))"
            }.joined(separator: ", ")
            logger.info(
                "relay \(spec.name) listening on \(relay.listenEndpoint.map(\.description) ?? "\(spec.listen)") -> \(upstreamList)",
                metadata: ["egress": .string("\(spec.egress)"), "on_busy": .string(spec.onBusy.rawValue)])
        }
        withExtendedLifetime(sources) { dispatchMain() }
    }

    /// Handles `number` on the main queue instead of its default action.
    private static func onSignal(
        _ number: Int32, _ name: String, _ handler: @escaping @Sendable (String) -> Void
    ) -> DispatchSourceSignal {
        signal(number, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: number, queue: .main)
        source.setEventHandler { handler(name) }
        source.activate()
        return source
    }
}

/// The daemon's relays, stopped together.
private final class RelayGroup: Sendable {
    let relays: [Relay]

    init(relays: [Relay]) {
        self.relays = relays
    }

    /// Stops every relay; `completion` runs once all of them have stopped.
    func stop(completion: @escaping @Sendable () -> Void) {
        let group = DispatchGroup()
        for relay in relays {
            group.enter()
            relay.stop { group.leave() }
        }
        group.notify(queue: .main, execute: completion)
    }
}
