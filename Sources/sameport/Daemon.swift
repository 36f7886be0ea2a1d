import Dispatch
import Glibc
import Logging
import SamePortCore
import SamePortNet

/// The daemon's lifetime: resolve, bind, serve until a signal, stop.
struct Daemon {
    var spec: RelaySpec
    var log: (level: Logger.Level, format: LogFormat)

    /// Starts the relay and never returns: the process exits from a signal or a fatal error.
    func run() throws -> Never {
        let format = log.format
        let level = log.level
        LoggingSystem.bootstrap { _ in StderrLogHandler(logLevel: level, format: format) }
        let logger = Logger(label: "sameport")
        ProcessLimits.ignoreSIGPIPE()
        ProcessLimits.raiseOpenFileLimit()

        let upstreams: [[Endpoint]]
        do {
            upstreams = try spec.upstreams.map { upstream throws(StartupError) in try Resolver.resolve(upstream) }
        } catch where error.isTemporary {
            throw StartFailure(message: "runtime failure: \(error.message)", exitCode: 1)
        } catch {
            throw StartFailure(message: "configuration error: \(error.message)", exitCode: 2)
        }
        let relay = Relay(spec: spec, upstreams: upstreams, logger: logger)
        relay.onFatalError = { message in
            logger.critical("\(message)")
            exit(1)
        }
        do {
            try relay.start()
        } catch {
            throw StartFailure(message: "cannot start: \(error.message)", exitCode: 2)
        }
        let upstreamList = zip(spec.upstreams, upstreams).map { name, addresses in
            addresses.count == 1 && name.endpoint != nil
                ? "\(name)" : "\(name) (\(addresses.map(\.description).joined(separator: ", ")))"
        }.joined(separator: ", ")
        logger.info(
            "relay \(spec.name) listening on \(relay.listenEndpoint.map(\.description) ?? "\(spec.listen)") -> \(upstreamList)",
            metadata: ["egress": .string("\(spec.egress)"), "on_busy": .string(spec.onBusy.rawValue)])

        let stop: @Sendable (String) -> Void = { name in
            logger.info("stopping on \(name)")
            relay.stop {
                logger.info("stopped")
                exit(0)
            }
            // Every connection is closed by stop(); should one hang, do not hang with it.
            DispatchQueue.main.asyncAfter(deadline: .now() + .seconds(5)) { exit(0) }
        }
        let sources = [
            Self.onSignal(SIGTERM, "SIGTERM", stop), Self.onSignal(SIGINT, "SIGINT", stop),
            // SIGHUP would end the process by default; a relay from command-line flags has nothing
            // to re-read, so say so and keep serving.
            Self.onSignal(SIGHUP, "SIGHUP") { _ in
                logger.notice("SIGHUP: nothing to reload for a relay configured on the command line; still serving")
            },
        ]
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
