import ArgumentParser
import SamePortCore

/// `sameport check`: validates a configuration file and shows the relays it would run.
struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Validate a configuration file and print the relays it would run.",
        discussion: """
            Reads --config FILE as 'sameport run --config FILE' would, without binding or resolving \
            anything. On success prints one row per relay (name, listen address (with ",transparent" \
            for transparent = true), upstreams ("original" with its destinations), egress, \
            busy policy, timeouts, keepalive as IDLE+INTERVALxCOUNT (with ,user=TIMEOUT when the user timeout differs), \
            limits, splice and pipe size, client access, PROXY protocol) and exits 0. Otherwise prints every \
            problem, one per line, as FILE:LINE:COLUMN: message, and exits 2.

            THE FILE (TOML)
              [defaults]                  keys every relay inherits (all but name and listen)
              [[relay]]                   one table per relay
              name = "partner"            required when the file has several relays
              listen = "127.0.0.1:7000"   IP:PORT, [IPv6]:PORT or *:PORT
              upstream = ["host:443"]     one HOST:PORT, a list, or "original": where
                                          each client was going (REDIRECT, DNAT, TPROXY)
              destinations = ["10.0.0.0/8:443"]
                                          with "original", required: CIDR[:PORT[-PORT]]
              transparent = false         IP_TRANSPARENT on the listener, for TPROXY
              egress = "same-port"        same-port, ephemeral, client, client-ip, IP:PORT
              on_busy = "queue"           queue, reject or ephemeral
              connect_timeout = "5s"      durations: 250ms, 5s, 10m, 1h
              idle_timeout = "0"          0: never (the default: keepalive finds vanished peers)
              keepalive = "60s"           TCP keepalive on both sockets after this idle time, whole
                                          seconds; "0" turns it off
              keepalive_interval = "10s"  between probes
              keepalive_count = 6         unanswered probes before the connection is dropped
              user_timeout = "2m"         TCP_USER_TIMEOUT: unacknowledged bytes for this long drop
                                          the connection; default keepalive + interval x count; "0": off
              max_per_client = 0          connections one client address may hold; 0: no limit
              drain_timeout = "30s"       on SIGTERM (or removed by a reload): open connections may
                                          finish for this long, then are cut; 0: cut at once
              max_connections = 1024
              queue_limit = 128
              buffer_size = 131072        bytes per direction, 4096 to 16777216
              allow = ["10.0.0.0/8"]      CIDR blocks; deny wins over allow
              deny = ["10.0.0.7"]
              splice = true               zero-copy through a pipe per direction, or false
              pipe_size = 1048576         bytes per pipe, 4096 to 16777216
              proxy_protocol = "v2"       send a PROXY header upstream: v1, v2 or off (default)
              accept_proxy = true         read a PROXY header from each client first
              accept_proxy_from = ["10.0.0.5"]  the proxies trusted to send one (required with it)
              proxy_timeout = "5s"        the whole header within this long

            LIMITS
              At most 4 MiB, 10,000 relays, names of 255 characters, keys of 128, brackets nested 16
              deep. Refused where they are: NUL and other control characters, bytes that are not
              UTF-8, a byte-order mark past the start, a CR without LF. FILE must be a regular file.

            EXAMPLES
              sameport check --config /etc/sameport/sameport.toml
              sameport check Config/*.toml     (one file at a time: use a loop)
            """
    )

    @Option(name: [.customShort("c"), .long], help: ArgumentHelp("The TOML file to validate ('-' for standard input).", valueName: "file"))
    var config: String?

    @Argument(help: ArgumentHelp("The file, given without --config.", valueName: "file"))
    var file: String?

    func run() throws {
        guard let config = config ?? file else {
            throw ValidationError("missing the file to check: sameport check --config FILE")
        }
        if let file, self.config != nil, file != config {
            throw ValidationError("two files to check, '\(config)' and '\(file)': give one")
        }
        let configuration = try ConfigFile.loadConfiguration(config)
        let relays = configuration.relays
        print(Self.table(relays))
        if let threads = configuration.threads {
            print("threads: \(threads) event loop\(threads == 1 ? "" : "s")")
        }
        print("\(config): \(relays.count) relay\(relays.count == 1 ? "" : "s"), configuration OK")
    }

    /// The PROXY protocol column: what is sent, and from whom a header is read and how long it may take.
    static func proxy(_ relay: RelaySpec) -> String {
        var parts: [String] = []
        if let version = relay.proxyProtocol { parts.append("send \(version.rawValue)") }
        if relay.acceptProxy {
            parts.append("accept from \(relay.acceptProxyFrom.map(\.description).joined(separator: ",")) within \(relay.proxyTimeout.shortDescription)")
        }
        return parts.isEmpty ? "off" : parts.joined(separator: "; ")
    }

    /// The relays as an aligned text table.
    static func table(_ relays: [RelaySpec]) -> String {
        let header = [
            "NAME", "LISTEN", "UPSTREAMS", "EGRESS", "ON-BUSY", "CONNECT", "IDLE", "KEEPALIVE", "DRAIN", "MAX-CONN", "PER-CLIENT",
            "QUEUE", "BUFFER", "SPLICE", "ACCESS", "PROXY",
        ]
        let rows = relays.map { relay -> [String] in
            var access: [String] = []
            if !relay.access.allow.isEmpty { access.append("allow " + relay.access.allow.map(\.description).joined(separator: ",")) }
            if !relay.access.deny.isEmpty { access.append("deny " + relay.access.deny.map(\.description).joined(separator: ",")) }
            return [
                relay.name, relay.transparent ? "\(relay.listen),transparent" : "\(relay.listen)",
                relay.forwardsToOriginal ? "original to \(relay.destinations.rules.map(\.description).joined(separator: ","))"
                    : relay.upstreams.map(\.description).joined(separator: ","),
                "\(relay.egress)", relay.onBusy.rawValue, relay.connectTimeout.shortDescription,
                relay.idleTimeout?.shortDescription ?? "off", "\(relay.keepalive)", relay.drainTimeout.shortDescription,
                "\(relay.maxConnections)", relay.maxPerClient == 0 ? "any" : "\(relay.maxPerClient)", "\(relay.queueLimit)",
                "\(relay.bufferSize)", relay.splice == .on ? "on/\(relay.pipeSize)" : "off", access.isEmpty ? "any" : access.joined(separator: "; "),
                proxy(relay),
            ]
        }
        let all = [header] + rows
        let widths = header.indices.map { column in all.map { $0[column].count }.max() ?? 0 }
        return all.map { row in
            row.enumerated().map { column, cell in
                column == row.count - 1 ? cell : cell + String(repeating: " ", count: widths[column] - cell.count)
            }.joined(separator: "  ")
        }.joined(separator: "\n")
    }
}
