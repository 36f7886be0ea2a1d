import ArgumentParser
import Glibc
import SamePortSystemd
import SamePortCore
import SamePortNet

/// `sameport run`: every relay of a configuration file, or one relay from command-line flags.
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run the relays of a configuration file, or one relay from flags (the default subcommand).",
        discussion: """
            Runs every relay of --config FILE, or one relay described by the flags below (the two \
            cannot be mixed). Either every relay starts or none does: each failure is listed, and \
            the exit status is 2.

            Accepts TCP clients on --listen and relays each to an upstream, dialling from the \
            listening ip:port (or as --egress says). Bytes are relayed both ways with bounded \
            buffers (zero-copy, with splice(2) through a pipe per direction, unless --splice off); \
            a half-close on one side is passed on to the other once pending bytes are \
            written, and a reset on one side resets the other. One line is logged per connection \
            when it ends: relay, client, egress, upstream, bytes each way, duration, and how it ended \
            (end=completed, client-reset, upstream-reset, idle-timeout, connect-failed, \
            busy-rejected, queue-timeout, queue-full, client-limit, refused, bad-proxy-header, \
            shutdown, error).

            ADDRESSES
              IPv4 as 127.0.0.1:7000, IPv6 as [::1]:7000, every local address as *:7000 (one \
            dual-stack socket). Upstreams may be host names: they are resolved at start-up and \
            every address, IPv4 and IPv6, is tried in order.

            EGRESS
              same-port   dial from the address the client reached and the listening port (default)
              ephemeral   dial from the address the client reached, with a kernel-chosen port
              IP:PORT     dial from this local ip:port (IP:0 for that IP with a kernel-chosen port)
              client      dial from the client's own ip:port (IP_TRANSPARENT: needs \
            CAP_NET_ADMIN, and replies routed back through this host)
              client-ip   dial from the client's own IP, with a kernel-chosen port (the same needs)

            TRANSPARENT FORWARDING (--upstream original)
              Each client goes to the destination it dialled: redirected here by an nftables \
            REDIRECT or DNAT rule (read with SO_ORIGINAL_DST), or delivered by TPROXY to a \
            listener with --transparent (IP_TRANSPARENT, needs CAP_NET_ADMIN). --destination \
            CIDR[:PORTS] (repeatable; 10.0.0.0/8, 192.0.2.1:443, [2001:db8::]/32:80-90) lists \
            where clients may go, and is required: 0.0.0.0/0 and ::/0 allow every destination. \
            A client that was not redirected, one whose destination is the relay itself (a \
            redirect loop), or one outside --destination is reset and logged with end=refused. \
            The egress is still the relay's own port (a wildcard listener dials from the \
            route's source address).

            WHEN EVERY UPSTREAM IS IN USE (--on-busy)
              queue       the client waits, in arrival order, up to --connect-timeout and \
            --queue-limit clients (default)
              reject      the client is reset at once, and the reason logged
              ephemeral   the client is served from an ephemeral source port, and that is logged

            CLIENT ACCESS (--allow, --deny)
              CIDR blocks such as 10.0.0.0/8, fd00::/8 or a single address; repeat for several. A \
            client in a deny block, or in no allow block when any is given, is reset at once and \
            logged with end=refused. Deny wins.

            PROXY PROTOCOL (HAProxy's, v1 text or v2 binary)
              --proxy-protocol v1|v2 writes a header to each upstream before the client's first \
            byte, announcing the client's ip:port and the ip:port it reached. --accept-proxy reads \
            one from each client before serving it (a proxy in front announces its client): only \
            senders in --accept-proxy-from may send one (required; others are reset, end=refused), \
            and the announced client counts for --allow/--deny, the log line and the header sent \
            on. A header that is malformed, cut short, oversized (v1 above 107 bytes, v2 above \
            16+4096) or not complete within --proxy-timeout (default 5s) closes the client with \
            end=bad-proxy-header; nothing of it reaches an upstream. v1 UNKNOWN and v2 LOCAL keep \
            the connection's own addresses.

            SIGNALS
              SIGTERM   stop accepting; open connections drain (--drain-timeout)
              SIGINT    stop now, cutting open connections (so does a 2nd SIGTERM)
              SIGHUP    re-read --config FILE, keeping open connections (--reload-timeout)

            UNDER SYSTEMD
              Sockets passed by systemd (LISTEN_FDS) go to the relay of the same name \
            (FileDescriptorName=); one socket with one relay is matched directly. sameport switches \
            SO_REUSEPORT on if needed, takes a root-owned socket over with CAP_CHOWN (then drops \
            it), and sends READY=1, STATUS=, WATCHDOG=1, RELOADING=1 and STOPPING=1 (Type=notify). \
            See packaging/systemd/.

            Durations are written 250ms, 5s, 10m or 1h. A port below 1024 needs root or \
            CAP_NET_BIND_SERVICE, for the egress sockets as well as the listener.

            EXAMPLES
              sameport run --config /etc/sameport/sameport.toml
              sameport --listen 127.0.0.1:7000 --upstream 127.0.0.1:9000
              sameport --listen '*:7000' --upstream partner.example:443 --upstream partner.example:8443
              sameport run --listen '[::1]:7000' --upstream '[::1]:9000' --on-busy reject --log-format json
              sameport --listen '*:7000' --upstream original --destination 10.0.0.0/8:443
            """
    )

    @Option(name: [.customShort("c"), .long], help: ArgumentHelp("Run the relays of this TOML file ('-' for standard input; see 'sameport check').", valueName: "file"))
    var config: String?

    /// An array so that a second --listen is an error rather than silently the one that counts.
    @Option(help: ArgumentHelp("Accept clients on this address: IP:PORT, [IPv6]:PORT or *:PORT.", valueName: "addr:port"))
    var listen: [String] = []

    @Option(help: ArgumentHelp("Relay to this upstream; repeat for several (tried round-robin, one per free 4-tuple).", valueName: "host:port"))
    var upstream: [String] = []

    @Option(help: ArgumentHelp("Where upstream connections come from: same-port (default), ephemeral, client, client-ip, or IP:PORT.", valueName: "mode"))
    var egress: String?

    @Option(name: .customLong("destination"), help: ArgumentHelp("With --upstream original: a destination clients may be forwarded to, CIDR[:PORT[-PORT]]; repeat for several (required).", valueName: "cidr[:ports]"))
    var destinations: [String] = []

    @Flag(help: "Set IP_TRANSPARENT on the listener, for connections delivered by TPROXY (needs CAP_NET_ADMIN).")
    var transparent = false

    @Option(name: .customLong("on-busy"), help: ArgumentHelp("When every upstream is in use from the egress: queue (default), reject or ephemeral.", valueName: "policy"))
    var onBusy: String?

    // Numbers and durations are parsed `.unconditional`: `--connect-timeout -5s` takes "-5s" as
    // its value and says what is wrong with it, where ArgumentParser would take it for an option
    // and say "Missing value".
    @Option(parsing: .unconditional, help: ArgumentHelp("Bound on each connect attempt, on retrying a busy 4-tuple, and on a queued client's wait (default 5s).", valueName: "duration"))
    var connectTimeout: String?

    @Option(parsing: .unconditional, help: ArgumentHelp("Close a connection after this long with no bytes either way; 0 (the default) turns it off: a vanished peer is found by keepalive.", valueName: "duration"))
    var idleTimeout: String?

    @Option(parsing: .unconditional, help: ArgumentHelp("TCP keepalive on both sockets: probe a connection idle this long, in whole seconds; 0 turns it off (default \(Keepalive.defaultIdle.shortDescription)).", valueName: "duration"))
    var keepalive: String?

    @Option(parsing: .unconditional, help: ArgumentHelp("Time between keepalive probes, in whole seconds (default \(Keepalive.defaultInterval.shortDescription)).", valueName: "duration"))
    var keepaliveInterval: String?

    @Option(parsing: .unconditional, help: ArgumentHelp("Unanswered keepalive probes before the connection is dropped, 1 to 127 (default \(Keepalive.defaultCount)).", valueName: "n"))
    var keepaliveCount: Int?

    @Option(parsing: .unconditional, help: ArgumentHelp("TCP_USER_TIMEOUT on both sockets: drop a connection whose sent bytes stay unacknowledged (or whose receiver reads nothing while bytes wait) this long; 0 turns it off (default: the keepalive bound, keepalive + interval x count).", valueName: "duration"))
    var userTimeout: String?

    @Option(parsing: .unconditional, help: ArgumentHelp("Connections (open or queued) one client address may hold; the next is reset and logged end=client-limit (default 0: no limit).", valueName: "n"))
    var maxPerClient: Int?

    @Option(parsing: .unconditional, help: ArgumentHelp("On SIGTERM, let open connections finish for this long before cutting them; 0 cuts them at once (default 30s). SIGINT always cuts at once.", valueName: "duration"))
    var drainTimeout: String?

    @Option(parsing: .unconditional, help: ArgumentHelp("Open connections (and queued clients) at most; at the limit new clients wait in the kernel's backlog (default \(RelaySpec.defaultMaxConnections)).", valueName: "n"))
    var maxConnections: Int?

    @Option(parsing: .unconditional, help: ArgumentHelp("Clients waiting for a free upstream at most, with --on-busy queue (default \(RelaySpec.defaultQueueLimit)).", valueName: "n"))
    var queueLimit: Int?

    @Option(parsing: .unconditional, help: ArgumentHelp("Bytes buffered per direction of each connection, from 4096 to 16777216 (default \(RelaySpec.defaultBufferSize)).", valueName: "bytes"))
    var bufferSize: Int?

    @Option(help: ArgumentHelp("Serve only clients in this CIDR block; repeat for several.", valueName: "cidr"))
    var allow: [String] = []

    @Option(help: ArgumentHelp("Refuse clients in this CIDR block; repeat for several. Deny wins over allow.", valueName: "cidr"))
    var deny: [String] = []

    @Option(help: ArgumentHelp("Move bytes with splice(2) through a pipe per direction: on (default) or off (read/write).", valueName: "on|off"))
    var splice: String?

    @Option(parsing: .unconditional, help: ArgumentHelp("Pipe size asked per direction with --splice on, from 4096 to 16777216 (default \(RelaySpec.defaultPipeSize)); the kernel may grant less.", valueName: "bytes"))
    var pipeSize: Int?

    /// Tuning, and how the tests run the whole suite on the splice path: not in --help.
    @Option(parsing: .unconditional, help: ArgumentHelp("Bytes each direction copies before a read that fills half its buffer switches it to splice (0: splice from the start).", valueName: "bytes", visibility: .hidden))
    var spliceAfter: Int?

    @Option(name: .customLong("proxy-protocol"), help: ArgumentHelp("Write a PROXY protocol header (v1 or v2) to each upstream before the client's bytes.", valueName: "v1|v2"))
    var proxyProtocol: String?

    @Flag(name: .customLong("accept-proxy"), help: "Read a PROXY protocol header (v1 or v2) from each client before serving it; needs --accept-proxy-from.")
    var acceptProxy = false

    @Option(name: .customLong("accept-proxy-from"), help: ArgumentHelp("With --accept-proxy: a CIDR block of the proxies trusted to send headers; repeat for several.", valueName: "cidr"))
    var acceptProxyFrom: [String] = []

    @Option(name: .customLong("proxy-timeout"), help: ArgumentHelp("With --accept-proxy: close a client whose header is not complete within this long (default 5s).", valueName: "duration"))
    var proxyTimeout: String?

    @Option(help: ArgumentHelp("The relay's name in logs (and, under socket activation, the fd name; default main).", valueName: "name"))
    var name: String?

    @Option(parsing: .unconditional, help: ArgumentHelp("With --config: a reload (SIGHUP) whose reading of the file and resolving of its host names takes longer fails, and the running configuration stays (default 60s).", valueName: "duration"))
    var reloadTimeout: String?

    @Option(parsing: .unconditional, help: ArgumentHelp("Event loops (shards) that accept and relay, each on its own thread: 1 to 256 (default: one per CPU sameport may run on).", valueName: "n"))
    var threads: Int?

    /// Tuning and measuring: how long a shard waits for more events before it gives its thread
    /// back to Dispatch (0: at once). Not in --help.
    @Option(parsing: .unconditional, help: ArgumentHelp("How long an idle shard keeps its thread (default 1ms).", valueName: "duration", visibility: .hidden))
    var linger: String?

    @Option(help: ArgumentHelp("Least severe level logged: trace, debug, info, notice, warning, error, critical.", valueName: "level"))
    var logLevel: String = "info"

    @Option(help: ArgumentHelp("Log lines as text or json.", valueName: "format"))
    var logFormat: String = "text"

    /// The relay flags given, by name: they describe a relay, and so cannot go with --config.
    private var relayFlagsGiven: [String] {
        let given: [(String, Bool)] = [
            ("--listen", !listen.isEmpty), ("--upstream", !upstream.isEmpty), ("--egress", egress != nil),
            ("--on-busy", onBusy != nil), ("--connect-timeout", connectTimeout != nil),
            ("--idle-timeout", idleTimeout != nil), ("--keepalive", keepalive != nil),
            ("--keepalive-interval", keepaliveInterval != nil), ("--keepalive-count", keepaliveCount != nil),
            ("--user-timeout", userTimeout != nil), ("--max-per-client", maxPerClient != nil),
            ("--drain-timeout", drainTimeout != nil), ("--max-connections", maxConnections != nil),
            ("--queue-limit", queueLimit != nil), ("--buffer-size", bufferSize != nil),
            ("--allow", !allow.isEmpty), ("--deny", !deny.isEmpty), ("--splice", splice != nil),
            ("--pipe-size", pipeSize != nil), ("--splice-after", spliceAfter != nil), ("--name", name != nil),
            ("--proxy-protocol", proxyProtocol != nil), ("--accept-proxy", acceptProxy),
            ("--accept-proxy-from", !acceptProxyFrom.isEmpty), ("--proxy-timeout", proxyTimeout != nil),
            ("--destination", !destinations.isEmpty), ("--transparent", transparent),
        ]
        return given.filter(\.1).map(\.0)
    }

    /// The relay spec the flags describe, or a usage error that names the bad value.
    func relaySpec() throws -> RelaySpec {
        guard let listen = listen.first else {
            throw ValidationError("missing --listen ADDR:PORT (or --config FILE): the address to accept clients on")
        }
        guard self.listen.count == 1 else {
            throw ValidationError("--listen given \(self.listen.count) times (\(self.listen.joined(separator: ", "))): a relay listens on one address; for several, write a configuration file with a [[relay]] for each (--config)")
        }
        do {
            let listenAddress = try HostPort(parsing: listen)
            guard !upstream.isEmpty else {
                throw ValidationError("missing --upstream HOST:PORT: where to relay clients to")
            }
            let original = upstream.contains("original")
            let spec = RelaySpec(
                name: name ?? "main",
                listen: listenAddress,
                upstreams: try upstream.filter { $0 != "original" }.map { text throws(AddressError) in try HostPort(parsing: text) },
                egress: try EgressMode(parsing: egress ?? "same-port"),
                onBusy: try BusyPolicy(parsing: onBusy ?? "queue"),
                connectTimeout: try connectTimeout.map { text throws(DurationError) in try Duration(parsing: text) }
                    ?? RelaySpec.defaultConnectTimeout,
                idleTimeout: try Self.optionalDuration(idleTimeout ?? "0"),
                keepalive: Keepalive(
                    idle: try keepalive.map { text throws(DurationError) in try Self.optionalDuration(text) } ?? Keepalive.defaultIdle,
                    interval: try keepaliveInterval.map { text throws(DurationError) in try Duration(parsing: text) }
                        ?? Keepalive.defaultInterval,
                    count: keepaliveCount ?? Keepalive.defaultCount,
                    userTimeout: try userTimeout.map { text throws(DurationError) in try Duration(parsing: text) }),
                maxPerClient: maxPerClient ?? 0,
                maxConnections: maxConnections ?? RelaySpec.defaultMaxConnections,
                queueLimit: queueLimit ?? RelaySpec.defaultQueueLimit,
                bufferSize: bufferSize ?? RelaySpec.defaultBufferSize,
                access: ClientAccess(
                    allow: try allow.map { text throws(OptionError) in try CIDR(parsing: text) },
                    deny: try deny.map { text throws(OptionError) in try CIDR(parsing: text) }),
                splice: try SpliceMode(parsing: splice ?? "on"),
                pipeSize: pipeSize ?? RelaySpec.defaultPipeSize,
                spliceAfter: spliceAfter ?? RelaySpec.defaultSpliceAfter,
                drainTimeout: try drainTimeout.map { text throws(DurationError) in try Duration(parsing: text) }
                    ?? RelaySpec.defaultDrainTimeout,
                proxyProtocol: try proxyProtocol.map { text throws(OptionError) in try ProxyProtocolVersion(parsing: text) },
                acceptProxy: acceptProxy,
                acceptProxyFrom: try acceptProxyFrom.map { text throws(OptionError) in try CIDR(parsing: text) },
                proxyTimeout: try proxyTimeout.map { text throws(DurationError) in try Duration(parsing: text) }
                    ?? RelaySpec.defaultProxyTimeout,
                forwardsToOriginal: original,
                destinations: Destinations(try destinations.map { text throws(OptionError) in try DestinationRule(parsing: text) }),
                transparent: transparent)
            if let problem = spec.problems().first { throw ValidationError(problem) }
            if let unused = unusedFlag(of: spec) { throw ValidationError(unused) }
            return spec
        } catch let error as ValidationError {
            throw error
        } catch {
            throw ValidationError("\(error)")
        }
    }

    /// A flag given on the command line that the other flags make a no-op: an error rather than
    /// silence, since whoever typed it expects it to do something. (A configuration file's
    /// [defaults] may well set keys that some relays do not use, so this is for flags only.)
    private func unusedFlag(of spec: RelaySpec) -> String? {
        if proxyTimeout != nil, !spec.acceptProxy {
            return "--proxy-timeout has no effect without --accept-proxy (it bounds the wait for a client's PROXY header): add --accept-proxy and --accept-proxy-from, or drop --proxy-timeout"
        }
        if spec.splice == .off {
            for (flag, given) in [("--pipe-size", pipeSize != nil), ("--splice-after", spliceAfter != nil)] where given {
                return "\(flag) has no effect with --splice off: drop \(flag), or leave splicing on"
            }
        }
        if spec.keepalive.idle == nil {
            for (flag, given) in [("--keepalive-interval", keepaliveInterval != nil), ("--keepalive-count", keepaliveCount != nil)] where given {
                return "\(flag) has no effect with --keepalive 0 (keepalive off): drop \(flag), or give --keepalive a duration such as 60s"
            }
        }
        if queueLimit != nil, spec.onBusy != .queue {
            return "--queue-limit has no effect with --on-busy \(spec.onBusy.rawValue) (no client waits in a queue): drop --queue-limit, or use --on-busy queue"
        }
        return nil
    }

    /// --reload-timeout, above zero.
    private func reloadTimeoutValue() throws -> Duration {
        guard let reloadTimeout else { return Daemon.defaultReloadTimeout }
        do {
            let value = try Duration(parsing: reloadTimeout)
            guard value > .zero else { throw ValidationError("--reload-timeout must be above 0: a reload needs some time to read the file") }
            return value
        } catch let error as DurationError {
            throw ValidationError("--reload-timeout: \(error)")
        }
    }

    private static func optionalDuration(_ text: String) throws(DurationError) -> Duration? {
        let duration = try Duration(parsing: text)
        return duration == .zero ? nil : duration
    }

    func logSettings() throws -> (level: Logging.Logger.Level, format: LogFormat) {
        guard let level = Logging.Logger.Level(rawValue: logLevel) else {
            throw ValidationError("invalid log level '\(logLevel)': expected trace, debug, info, notice, warning, error or critical")
        }
        guard let format = LogFormat(rawValue: logFormat) else {
            throw ValidationError("invalid log format '\(logFormat)': expected text or json")
        }
        return (level, format)
    }

    /// Sets the number of shards (--threads, else the file's `threads`, else one per CPU) and
    /// their linger, before any relay starts.
    private func configureEventLoops(fileThreads: Int?) throws {
        if let threads, !(1...256).contains(threads) {
            throw ValidationError("invalid --threads \(threads): give a number of event loops from 1 to 256 (the default is one per CPU, \(EventLoopGroup.availableCPUs) here)")
        }
        var lingerValue = EventLoopGroup.defaultLinger
        if let linger {
            do {
                lingerValue = try Duration(parsing: linger)
            } catch {
                throw ValidationError("invalid --linger '\(linger)': \(error)")
            }
        }
        EventLoopGroup.configure(threads: threads ?? fileThreads, linger: lingerValue)
    }

    /// Validation happens here rather than in `validate()`, so that ArgumentParser reports an
    /// unknown option before a missing one.
    func run() throws {
        do {
            let log = try logSettings()
            if let config {
                let given = relayFlagsGiven
                guard given.isEmpty else {
                    throw ValidationError("--config cannot be mixed with \(given.joined(separator: ", ")): put the relay's settings in \(config), or drop --config")
                }
                let reloadTimeout = try reloadTimeoutValue()
                let configuration = try ConfigFile.loadConfiguration(config)
                try configureEventLoops(fileThreads: configuration.threads)
                try Daemon(relays: configuration.relays, configPath: config, log: log, reloadTimeout: reloadTimeout,
                           threadsKey: configuration.threads).run()
            }
            guard reloadTimeout == nil else {
                throw ValidationError("--reload-timeout needs --config FILE: a relay from flags has no file to reload")
            }
            try configureEventLoops(fileThreads: nil)
            try Daemon(relays: [try relaySpec()], configPath: nil, log: log).run()
        } catch let failure as StartFailure {
            // Under systemd: the errno it records for the unit, and the cause in `systemctl status`.
            Notifier().failed(errno: failure.errno ?? EINVAL, status: failure.details.first ?? failure.messages.first ?? "start-up failed")
            throw failure
        } catch let error as ValidationError {
            Notifier().failed(errno: EINVAL, status: "usage error: \(error.message)")
            throw error
        }
    }
}

import Logging
