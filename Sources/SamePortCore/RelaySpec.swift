/// Everything one relay needs to run, validated: where it listens, where it forwards, and how.
public struct RelaySpec: Sendable, Equatable {
    /// The relay's name: used in logs and, under socket activation, to match a named fd.
    public var name: String
    /// The address to accept clients on (an IP or `*`, never a host name).
    public var listen: HostPort
    /// The upstreams, in order; host names are resolved at start-up. Empty when the relay
    /// forwards to each client's original destination.
    public var upstreams: [HostPort]
    /// `upstream = "original"`: each client goes to the destination it dialled (read with
    /// SO_ORIGINAL_DST after a REDIRECT/DNAT, or the accepted socket's own address under TPROXY).
    public var forwardsToOriginal: Bool
    /// With `forwardsToOriginal`: the original destinations that may be dialled (required).
    public var destinations: Destinations
    /// The listener has IP_TRANSPARENT, so that TPROXY can hand it connections to any address.
    public var transparent: Bool
    public var egress: EgressMode
    public var onBusy: BusyPolicy
    /// How long one connect attempt, and a queued client's wait, may last.
    public var connectTimeout: Duration
    /// Close a connection when neither side sent anything for this long; nil: never, the
    /// default: a quiet connection may be a healthy one (a database session, a tunnel), and a
    /// peer that vanished is found by `keepalive` instead.
    public var idleTimeout: Duration?
    /// TCP keepalive and TCP_USER_TIMEOUT on both sockets of each connection (on by default).
    public var keepalive: Keepalive
    /// Connections (open, dialling or queued) one client address may hold at once; 0: no limit.
    /// A client past it is reset and logged `end=client-limit`.
    public var maxPerClient: Int
    /// Open connections at most; at the limit the relay stops accepting until one ends.
    public var maxConnections: Int
    /// Clients waiting for a free upstream at most (with `onBusy == .queue`).
    public var queueLimit: Int
    /// Bytes buffered per direction of a connection (the back-pressure bound).
    public var bufferSize: Int
    /// Which clients are served; a refused client is closed at once and logged.
    public var access: ClientAccess
    /// Whether bytes move with splice(2) (through a pipe per direction) or with read/write.
    public var splice: SpliceMode
    /// The pipe size asked per direction with splice (the kernel may grant less, never fail).
    public var pipeSize: Int
    /// With splice: the bytes each direction copies before it switches to splice (0: splice from
    /// the start).
    public var spliceAfter: Int
    /// How long open connections may go on once the relay stops (SIGTERM, or removed by a reload)
    /// before they are cut; 0 cuts them at once.
    public var drainTimeout: Duration
    /// The PROXY protocol header written to each upstream before any byte of the client's,
    /// announcing the client and the address it reached; nil: none.
    public var proxyProtocol: ProxyProtocolVersion?
    /// Each client starts with a PROXY protocol header (v1 or v2, from a proxy in front), read
    /// before the client is served: the client it announces is the client from then on.
    public var acceptProxy: Bool
    /// The senders trusted to announce a client; required with `acceptProxy`. Any other sender is
    /// refused: whoever may send a header may claim any address.
    public var acceptProxyFrom: [CIDR]
    /// How long a client may take to send its whole PROXY header.
    public var proxyTimeout: Duration

    public static let defaultConnectTimeout = Duration.seconds(5)
    public static let defaultMaxConnections = 1024
    public static let defaultQueueLimit = 128
    public static let defaultBufferSize = 128 * 1024
    public static let defaultPipeSize = 1 << 20
    /// Measured on loopback (2 cores, 128 KiB buffer, 256 KiB pipe, scripts/small-transfers.py and
    /// scripts/throughput.py): a connection that splices costs the relay 25-40 us more CPU than one
    /// that copies (its pipes' pipe2, F_SETPIPE_SZ and close; about 10 % of a short connection),
    /// and splicing saves about 0.1 s of CPU per GiB (0.1 us per KiB): a pipe pays for itself
    /// after some 300 KiB.
    public static let defaultSpliceAfter = 256 * 1024
    /// Long enough for most requests in flight to finish, short of systemd's 90 s stop timeout.
    public static let defaultDrainTimeout = Duration.seconds(30)
    /// A proxy sends its header at once with the connection (the specification): 5 s is lenient
    /// for a slow network and short for a client that never sends one.
    public static let defaultProxyTimeout = Duration.seconds(5)
    /// The longest name: systemd's limit for `FileDescriptorName=`, which a relay's name matches
    /// under socket activation. A name is repeated in every log line.
    public static let maxNameLength = 255

    public init(
        name: String = "main",
        listen: HostPort,
        upstreams: [HostPort],
        egress: EgressMode = .samePort,
        onBusy: BusyPolicy = .queue,
        connectTimeout: Duration = RelaySpec.defaultConnectTimeout,
        idleTimeout: Duration? = nil,
        keepalive: Keepalive = Keepalive(),
        maxPerClient: Int = 0,
        maxConnections: Int = RelaySpec.defaultMaxConnections,
        queueLimit: Int = RelaySpec.defaultQueueLimit,
        bufferSize: Int = RelaySpec.defaultBufferSize,
        access: ClientAccess = ClientAccess(),
        splice: SpliceMode = .on,
        pipeSize: Int = RelaySpec.defaultPipeSize,
        spliceAfter: Int = RelaySpec.defaultSpliceAfter,
        drainTimeout: Duration = RelaySpec.defaultDrainTimeout,
        proxyProtocol: ProxyProtocolVersion? = nil,
        acceptProxy: Bool = false,
        acceptProxyFrom: [CIDR] = [],
        proxyTimeout: Duration = RelaySpec.defaultProxyTimeout,
        forwardsToOriginal: Bool = false,
        destinations: Destinations = Destinations(),
        transparent: Bool = false
    ) {
        self.name = name
        self.listen = listen
        self.upstreams = upstreams
        self.forwardsToOriginal = forwardsToOriginal
        self.destinations = destinations
        self.transparent = transparent
        self.egress = egress
        self.onBusy = onBusy
        self.connectTimeout = connectTimeout
        self.idleTimeout = idleTimeout
        self.keepalive = keepalive
        self.maxPerClient = maxPerClient
        self.maxConnections = maxConnections
        self.queueLimit = queueLimit
        self.bufferSize = bufferSize
        self.access = access
        self.splice = splice
        self.pipeSize = pipeSize
        self.spliceAfter = spliceAfter
        self.drainTimeout = drainTimeout
        self.proxyProtocol = proxyProtocol
        self.acceptProxy = acceptProxy
        self.acceptProxyFrom = acceptProxyFrom
        self.proxyTimeout = proxyTimeout
    }

    /// Every problem with this spec, each a message that names the value and the fix; empty if valid.
    public func problems() -> [String] {
        fieldProblems().map(\.message)
    }

    /// A problem with one field of a spec: the configuration file reports it at that field's key.
    public struct Problem: Equatable, Sendable {
        public enum Field: Equatable, Sendable {
            case name, listen, upstream(index: Int), egress, connectTimeout, idleTimeout
            case maxConnections, queueLimit, bufferSize, pipeSize, spliceAfter, drainTimeout
            case keepalive(Keepalive.Field)
            case maxPerClient
            case acceptProxyFrom, proxyTimeout
            /// The upstreams have no address of the egress's family.
            case upstreamFamilies
            case destinations
            /// This upstream is the relay's own listen address: it would dial itself.
            case upstreamIsListener(index: Int)
        }
        public var field: Field
        public var message: String
    }

    /// Every problem with this spec, with the field it is about.
    public func fieldProblems() -> [Problem] {
        var problems: [Problem] = []
        func add(_ field: Problem.Field, _ message: String) {
            problems.append(Problem(field: field, message: message))
        }
        let nameLength = name.unicodeScalars.count
        if nameLength > Self.maxNameLength {
            // Not repeated in the message: it may be megabytes long.
            add(.name, "relay name of \(nameLength) characters: a name is at most \(Self.maxNameLength) (it also names the relay's socket in systemd's FileDescriptorName=); shorten it")
        } else if name.isEmpty || !name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isASCIIDigit || "-_.".contains($0)) }) {
            add(.name, "invalid relay name '\(name)': use ASCII letters, digits, '-', '_' or '.'")
        }
        if case .name = listen.host {
            add(.listen, "invalid listen address '\(listen)': listen on an IP address or *:PORT, not a host name")
        }
        if let endpoint = listen.endpoint, endpoint.address != endpoint.address.unmapped {
            add(.listen, "invalid listen address '\(listen)': listen on \(endpoint.unmapped), not its IPv4-mapped form")
        }
        if listen.port == 0 {
            add(.listen, "invalid listen address '\(listen)': the port must be from 1 to 65535")
        }
        if forwardsToOriginal {
            if !upstreams.isEmpty {
                add(.upstream(index: 0), "upstream \"original\" cannot be listed with other upstreams: give either \"original\" or HOST:PORT upstreams")
            }
            if destinations.isEmpty {
                add(.upstream(index: 0), "upstream \"original\" with no destinations would relay clients to any address they dial (an open proxy): list the allowed ones, e.g. destinations = [\"10.0.0.0/8:443\"] (--destination 10.0.0.0/8:443), or \"0.0.0.0/0\" and \"::/0\" to allow every destination")
            }
        } else {
            if upstreams.isEmpty {
                add(.upstream(index: 0), "no upstream: give at least one --upstream HOST:PORT")
            }
            if !destinations.isEmpty {
                add(.destinations, "destinations apply only to upstream \"original\": drop them, or set upstream = \"original\" (--upstream original)")
            }
        }
        for (index, upstream) in upstreams.enumerated() {
            if upstream.host == .any {
                add(.upstream(index: index), "invalid upstream '\(upstream)': '*' is for listening; name the upstream's host")
            } else if upstream.port == 0 {
                add(.upstream(index: index), "invalid upstream '\(upstream)': the port must be from 1 to 65535")
            } else if upstreams[..<index].contains(upstream) {
                // With a fixed egress the second listing is the same 4-tuple, never free when the
                // first is busy; with an ephemeral one it only skews the round-robin.
                add(.upstream(index: index), "upstream \(upstream) is listed twice: list each upstream once")
            }
        }
        // Known before any name is resolved: a literal upstream on the listen address, or on a
        // loopback address of a wildcard listener's port. The relay checks resolved names and
        // every local address when it starts, and each dial.
        let listener = listen.endpoint ?? (listen.host == .any ? Endpoint(.anyV6, listen.port) : nil)
        for (index, upstream) in upstreams.enumerated() {
            guard let listener, listener.port != 0, let endpoint = upstream.endpoint,
                  SelfDial.reaches(endpoint, listener: listener, isLocal: \.isLoopback) else { continue }
            add(.upstreamIsListener(index: index), "upstream \(upstream) is the relay's own listen address \(listen): the relay would dial itself; \(SelfDial.fix)")
        }
        if let listenEndpoint = listen.endpoint, case .fixed(let egress) = egress,
           egress.address.isIPv6 != listenEndpoint.address.unmapped.isIPv6, !listenEndpoint.address.isUnspecified {
            add(.egress, "egress \(egress) and listen \(listen) are of different address families")
        }
        // Host names are checked once resolved; literal addresses can be checked now.
        let literals = upstreams.compactMap { $0.endpoint?.address.unmapped }
        if !problems.contains(where: { $0.field == .egress }),
           let egressAddress = staticEgressAddress, !literals.isEmpty, literals.count == upstreams.count,
           !literals.contains(where: { $0.isIPv6 == egressAddress.isIPv6 }) {
            let family = egressAddress.familyName
            add(.upstreamFamilies, "no upstream has an \(family) address to dial from \(egressAddress); give an \(family) upstream, or listen on an address of the upstreams' family")
        }
        if connectTimeout <= .zero {
            add(.connectTimeout, "the connect timeout must be above 0 (for example 5s)")
        }
        if let idleTimeout, idleTimeout < .zero {
            add(.idleTimeout, "the idle timeout cannot be negative (0 turns it off)")
        }
        if drainTimeout < .zero {
            add(.drainTimeout, "the drain timeout cannot be negative (0 cuts open connections at once)")
        }
        for (field, message) in keepalive.problems() {
            add(.keepalive(field), message)
        }
        if !(0...1_000_000).contains(maxPerClient) {
            add(.maxPerClient, "max per client must be from 0 (no limit) to 1000000, not \(maxPerClient)")
        }
        if !(1...1_000_000).contains(maxConnections) {
            add(.maxConnections, "max connections must be from 1 to 1000000, not \(maxConnections)")
        }
        if !(0...1_000_000).contains(queueLimit) {
            add(.queueLimit, "the queue limit must be from 0 to 1000000, not \(queueLimit)")
        }
        if !(4096...(16 << 20)).contains(bufferSize) {
            add(.bufferSize, "the buffer size must be from 4096 to 16777216 bytes, not \(bufferSize)")
        }
        if !(4096...(16 << 20)).contains(pipeSize) {
            add(.pipeSize, "the pipe size must be from 4096 to 16777216 bytes, not \(pipeSize)")
        }
        if !(0...(1 << 30)).contains(spliceAfter) {
            add(.spliceAfter, "the splice threshold must be from 0 to 1073741824 bytes, not \(spliceAfter)")
        }
        if acceptProxy, acceptProxyFrom.isEmpty {
            add(.acceptProxyFrom, "accept_proxy needs accept_proxy_from: list the proxies trusted to announce clients (whoever may send a header may claim any address), for example accept_proxy_from = [\"127.0.0.1\"] (--accept-proxy-from 127.0.0.1)")
        } else if !acceptProxy, !acceptProxyFrom.isEmpty {
            add(.acceptProxyFrom, "accept_proxy_from without accept_proxy: the headers would be relayed as the client's bytes; add accept_proxy = true (--accept-proxy), or drop accept_proxy_from")
        }
        if proxyTimeout <= .zero {
            add(.proxyTimeout, "the PROXY header timeout must be above 0 (for example 5s)")
        }
        return problems
    }

    /// The address every upstream connection is dialled from, when it is known before any client
    /// arrives: nil for a wildcard listener, whose egress is the address each client reached.
    public var staticEgressAddress: IPAddress? {
        let address: IPAddress?
        switch egress {
        case .fixed(let endpoint): address = endpoint.address
        case .samePort, .ephemeral: address = listen.endpoint?.address.unmapped
        case .client, .clientIP: address = nil  // each client's own
        }
        guard let address, !address.isUnspecified else { return nil }
        return address
    }
}
