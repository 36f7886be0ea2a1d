import SamePortCore

/// A configuration file, read and validated: the relays it describes.
///
/// The format (README.md, "The configuration file"):
///
///     [defaults]                 # optional; every relay inherits these keys
///     connect_timeout = "5s"
///
///     [[relay]]                  # one table per relay
///     name = "partner"
///     listen = "127.0.0.1:7000"
///     upstream = ["partner.example:443"]
///
/// A relay's own keys override the defaults; `allow` and `deny` replace the default lists rather
/// than extend them.
public struct Configuration: Sendable, Equatable {
    public var relays: [RelaySpec]
    /// The top-level `threads` key: event loops (shards) for the whole process; nil: one per CPU.
    public var threads: Int?

    /// The most event loops `threads` may ask for.
    public static let threadRange = 1...256

    /// Parses and validates `text`, read from `path` (used in the problems' positions).
    ///
    /// - Throws: every problem found, in file order.
    public init(text: String, path: String) throws(ConfigurationError) {
        try self.init(bytes: Array(text.utf8), path: path)
    }

    /// Parses and validates the bytes of the file at `path`: the text is screened (size, UTF-8,
    /// control characters; see `TextScreen` and `ConfigurationLimits`) before the parser sees it.
    ///
    /// - Throws: every problem found, in file order.
    public init(bytes: [UInt8], path: String) throws(ConfigurationError) {
        guard bytes.count <= ConfigurationLimits.fileSize else {
            throw ConfigurationError(problems: [ConfigurationProblem(
                path: path, position: .start,
                message: "the file is larger than \(ConfigurationLimits.fileSize >> 20) MiB, the most a configuration file may be (\(ConfigurationLimits.relays) relays need far less): is it the right file?")])
        }
        let screened = TextScreen.check(bytes)
        guard screened.isEmpty else {
            throw ConfigurationError(problems: screened.map { ConfigurationProblem(path: path, position: $0.0, message: $0.1) })
        }
        var reader = Reader(path: path, text: String(decoding: bytes, as: UTF8.self))
        let relays = reader.read()
        guard reader.problems.isEmpty else {
            throw ConfigurationError(problems: reader.sortedProblems())
        }
        self.relays = relays
        threads = reader.threads
    }
}

/// One problem in a configuration file, printed as `FILE:LINE:COLUMN: message`.
public struct ConfigurationProblem: Hashable, Sendable, CustomStringConvertible {
    public var path: String
    public var position: SourcePosition
    public var message: String

    public var description: String { "\(path):\(position): \(message)" }
}

/// Every problem found in a configuration file.
public struct ConfigurationError: Error, Sendable, Equatable, CustomStringConvertible {
    public var problems: [ConfigurationProblem]

    public init(problems: [ConfigurationProblem]) {
        self.problems = problems
    }

    /// One problem per line.
    public var description: String { problems.map(\.description).joined(separator: "\n") }
}

/// The keys a `[[relay]]` table may have, in the order the documentation lists them.
public enum RelayKey: String, CaseIterable, Sendable {
    case name, listen, upstream, egress
    case onBusy = "on_busy"
    case connectTimeout = "connect_timeout"
    case idleTimeout = "idle_timeout"
    case keepalive
    case keepaliveInterval = "keepalive_interval"
    case keepaliveCount = "keepalive_count"
    case userTimeout = "user_timeout"
    case drainTimeout = "drain_timeout"
    case maxConnections = "max_connections"
    case maxPerClient = "max_per_client"
    case queueLimit = "queue_limit"
    case bufferSize = "buffer_size"
    case allow, deny, splice
    case pipeSize = "pipe_size"
    case proxyProtocol = "proxy_protocol"
    case acceptProxy = "accept_proxy"
    case acceptProxyFrom = "accept_proxy_from"
    case proxyTimeout = "proxy_timeout"
    case destinations, transparent

    /// Keys that name one relay and so cannot be defaults.
    var isPerRelay: Bool { self == .name || self == .listen }
}

/// Reads the parsed document into specs, collecting every problem on the way.
private struct Reader {
    let path: String
    let text: String
    var problems: Set<ConfigurationProblem> = []
    /// The top-level `threads` key, when given and valid.
    var threads: Int?
    /// Made once `SyntaxGuard` has bounded the nesting its scan recurses on.
    private var locator = SourceLocator("")

    init(path: String, text: String) {
        self.path = path
        self.text = text
    }

    func sortedProblems() -> [ConfigurationProblem] {
        problems.sorted { ($0.position, $0.message) < ($1.position, $1.message) }
    }

    mutating func report(_ message: String, at position: SourcePosition?) {
        problems.insert(ConfigurationProblem(path: path, position: position ?? .start, message: message))
    }

    mutating func read() -> [RelaySpec] {
        if let (position, message) = SyntaxGuard.check(text) {
            report(message, at: position)
            return []
        }
        locator = SourceLocator(text)
        let document: [String: TOMLNode]
        do {
            document = try TOMLNode.parse(text)
        } catch {
            report(
                "syntax error: \(error.description)\(Self.quotingHint(line: error.line, in: text))",
                at: SourcePosition(line: max(error.line, 1), column: max(error.column, 1)))
            return []
        }

        var defaults = Fields()
        for key in document.keys.sorted() {
            guard let value = document[key] else { continue }
            let position = locator.root?.keys[key]?.position ?? tablePosition(key)
            switch key {
            case "defaults":
                guard let table = value.table else {
                    report("'defaults' must be a table: write [defaults] above its keys", at: position)
                    continue
                }
                defaults = readFields(table, where: locator.table("defaults"), context: "[defaults]", isDefaults: true)
            case "relay":
                continue
            case "threads":
                let range = Configuration.threadRange
                guard value.type == .int, let number = value.int, range.contains(number) else {
                    report("'threads' must be a whole number from \(range.lowerBound) to \(range.upperBound): the event loops that accept and relay (leave it out for one per CPU)", at: position)
                    continue
                }
                threads = number
            default:
                if RelayKey(rawValue: key) != nil {
                    report("'\(key)' must be inside a [[relay]] table (or [defaults])", at: position)
                } else {
                    let what = value.type == .table ? "table [\(key)]" : value.type == .array ? "array '\(key)'" : "key '\(key)'"
                    let hint = Self.nearest(key, among: ["defaults", "relay", "threads"]).map { "did you mean \($0 == "relay" ? "[[relay]]" : $0 == "threads" ? "threads" : "[defaults]")?" }
                    report("unknown \(what) at the top level; \(hint ?? "the file has threads, [defaults] and [[relay]] tables")", at: position)
                }
            }
        }

        guard let relayValue = document["relay"] else {
            report("no [[relay]] table: define at least one relay, with listen and upstream", at: .start)
            return []
        }
        guard let relayTables = relayValue.array?.map({ $0.table }) else {
            report("'relay' must be an array of tables: write [[relay]] (two brackets) above each relay", at: tablePosition("relay"))
            return []
        }
        guard !relayTables.isEmpty else {
            report("no relay: 'relay' is an empty list; define at least one [[relay]] with listen and upstream", at: tablePosition("relay"))
            return []
        }
        // [[relay]] headers were counted before parsing; an inline list is counted here.
        guard relayTables.count <= ConfigurationLimits.relays else {
            report("\(relayTables.count) relays: one sameport process runs at most \(ConfigurationLimits.relays); split them across several files, one service each", at: tablePosition("relay"))
            return []
        }
        var specs: [RelaySpec] = []
        var comparable: [Candidate] = []
        // Looked up once: searching the tables for each relay made `check` quadratic.
        let inlineRelays = locator.root?.keys["relay"]?.elements ?? []
        let relayPosition = tablePosition("relay")
        for (index, table) in relayTables.enumerated() {
            let place = RelayPlace(
                index: index,
                located: locator.arrayElement("relay", index: index),
                fallback: inlineRelays[safe: index] ?? relayPosition)
            guard let table else {
                report("relay #\(index + 1) must be a table of keys", at: place.position)
                continue
            }
            let fields = readFields(table, where: place.located, context: "[[relay]]", isDefaults: false)
            let (spec, isValid) = makeSpec(fields, defaults: defaults, place: place, relayCount: relayTables.count)
            if isValid { specs.append(spec) }
            // Names and listen addresses are compared across relays even when other keys are wrong.
            comparable.append(Candidate(
                name: fields.name?.value ?? (relayTables.count == 1 ? spec.name : nil),
                listen: fields.listen?.value, place: place))
        }
        checkAcrossRelays(comparable)
        return specs
    }

    /// Where a relay table is: its `[[relay]]` header, or the element of an inline array.
    struct RelayPlace {
        var index: Int
        var located: SourceLocator.Table?
        var fallback: SourcePosition?

        var position: SourcePosition? { located?.position ?? fallback }

        func keyPosition(_ key: RelayKey) -> SourcePosition? {
            located?.keys[key.rawValue]?.position ?? position
        }
    }

    /// A value read from the file, with the position to report its problems at.
    struct Located<Value> {
        var value: Value
        var position: SourcePosition?
        /// For a list, where each element is.
        var elements: [SourcePosition] = []
        /// For a list, false when some element was wrong (and reported) and left out.
        var isComplete = true

        func position(ofElement index: Int) -> SourcePosition? {
            elements[safe: index] ?? position
        }
    }

    /// The keys of one table that parsed; a key whose value is wrong is reported and left out.
    struct Fields {
        var name: Located<String>?
        var listen: Located<HostPort>?
        var upstreams: Located<[HostPort]>?
        var egress: Located<EgressMode>?
        var onBusy: Located<BusyPolicy>?
        var connectTimeout: Located<Duration>?
        var idleTimeout: Located<Duration?>?
        var keepalive: Located<Duration?>?
        var keepaliveInterval: Located<Duration>?
        var keepaliveCount: Located<Int>?
        var userTimeout: Located<Duration>?
        var drainTimeout: Located<Duration>?
        var maxConnections: Located<Int>?
        var maxPerClient: Located<Int>?
        var queueLimit: Located<Int>?
        var bufferSize: Located<Int>?
        var allow: Located<[CIDR]>?
        var deny: Located<[CIDR]>?
        var splice: Located<SpliceMode>?
        var pipeSize: Located<Int>?
        /// nil inside: `off`.
        var proxyProtocol: Located<ProxyProtocolVersion?>?
        var acceptProxy: Located<Bool>?
        var acceptProxyFrom: Located<[CIDR]>?
        var proxyTimeout: Located<Duration>?
        /// `upstream = "original"` (then `upstreams` is empty).
        var original: Located<Bool>?
        var destinations: Located<[DestinationRule]>?
        var transparent: Located<Bool>?
        /// Keys that were present, even if their value was wrong: no "missing key" for those.
        var present: Set<RelayKey> = []
        /// Keys that an unknown key was taken for ("did you mean"): not reported missing either.
        var suggested: Set<RelayKey> = []
    }

    mutating func readFields(
        _ table: [String: TOMLNode], where located: SourceLocator.Table?, context: String, isDefaults: Bool
    ) -> Fields {
        var fields = Fields()
        for key in table.keys.sorted() {
            guard let value = table[key] else { continue }
            let keyLocation = located?.keys[key]
            let keyPosition = keyLocation?.position ?? located?.position
            let valuePosition = keyLocation?.value ?? keyPosition
            guard let relayKey = RelayKey(rawValue: key) else {
                if let meant = Self.nearest(key, among: RelayKey.allCases.map(\.rawValue)), let meantKey = RelayKey(rawValue: meant) {
                    report("unknown key '\(key)' in \(context); did you mean '\(meant)'?", at: keyPosition)
                    fields.suggested.insert(meantKey)
                } else {
                    let known = RelayKey.allCases.filter { !isDefaults || !$0.isPerRelay }.map(\.rawValue)
                    report("unknown key '\(key)' in \(context); expected one of \(known.joined(separator: ", "))", at: keyPosition)
                }
                continue
            }
            if isDefaults && relayKey.isPerRelay {
                report("'\(key)' cannot be a default: each relay needs its own \(key)", at: keyPosition)
                continue
            }
            fields.present.insert(relayKey)
            let elements = keyLocation?.elements ?? []
            func locate<V>(_ value: V) -> Located<V> {
                Located(value: value, position: valuePosition, elements: elements)
            }
            switch relayKey {
            case .name:
                fields.name = string(value, key, at: valuePosition).map(locate)
            case .listen:
                fields.listen = string(value, key, at: valuePosition).flatMap { parse($0, at: valuePosition, HostPort.init(parsing:)) }.map(locate)
            case .upstream:
                if value.string == "original" {
                    fields.upstreams = locate([])
                    fields.original = locate(true)
                } else {
                    fields.upstreams = list(value, key, at: valuePosition, elements: elements, emptyAllowed: false) { text throws(OptionError) in
                        guard text != "original" else {
                            throw OptionError("upstream \"original\" stands alone: write upstream = \"original\", not in a list with other upstreams")
                        }
                        do {
                            return try HostPort(parsing: text)
                        } catch {
                            throw OptionError("\(error)")
                        }
                    }
                }
            case .egress:
                fields.egress = string(value, key, at: valuePosition).flatMap { parse($0, at: valuePosition, EgressMode.init(parsing:)) }.map(locate)
            case .onBusy:
                fields.onBusy = string(value, key, at: valuePosition).flatMap { parse($0, at: valuePosition, BusyPolicy.init(parsing:)) }.map(locate)
            case .connectTimeout:
                fields.connectTimeout = duration(value, key, at: valuePosition).map(locate)
            case .idleTimeout:
                fields.idleTimeout = duration(value, key, at: valuePosition).map { locate($0 == .zero ? nil : $0) }
            case .keepalive:
                fields.keepalive = duration(value, key, at: valuePosition).map { locate($0 == .zero ? nil : $0) }
            case .keepaliveInterval:
                fields.keepaliveInterval = duration(value, key, at: valuePosition).map(locate)
            case .keepaliveCount:
                fields.keepaliveCount = integer(value, key, at: valuePosition).map(locate)
            case .userTimeout:
                fields.userTimeout = duration(value, key, at: valuePosition).map(locate)
            case .drainTimeout:
                fields.drainTimeout = duration(value, key, at: valuePosition).map(locate)
            case .maxConnections:
                fields.maxConnections = integer(value, key, at: valuePosition).map(locate)
            case .maxPerClient:
                fields.maxPerClient = integer(value, key, at: valuePosition).map(locate)
            case .queueLimit:
                fields.queueLimit = integer(value, key, at: valuePosition).map(locate)
            case .bufferSize:
                fields.bufferSize = integer(value, key, at: valuePosition).map(locate)
            case .allow:
                // An empty list is how a relay drops the allow list it would inherit.
                fields.allow = list(value, key, at: valuePosition, elements: elements, emptyAllowed: true, CIDR.init(parsing:))
            case .deny:
                fields.deny = list(value, key, at: valuePosition, elements: elements, emptyAllowed: true, CIDR.init(parsing:))
            case .splice:
                // `splice = true` reads as naturally in TOML as the command line's on/off.
                if value.type == .bool, let on = value.bool {
                    fields.splice = locate(on ? SpliceMode.on : .off)
                } else {
                    fields.splice = string(value, key, at: valuePosition).flatMap { parse($0, at: valuePosition, SpliceMode.init(parsing:)) }.map(locate)
                }
            case .pipeSize:
                fields.pipeSize = integer(value, key, at: valuePosition).map(locate)
            case .proxyProtocol:
                fields.proxyProtocol = string(value, key, at: valuePosition).flatMap { text in
                    parse(text, at: valuePosition) { text throws(OptionError) -> ProxyProtocolVersion? in
                        if text == "off" { return nil }
                        guard let version = ProxyProtocolVersion(rawValue: text) else {
                            throw OptionError("invalid proxy_protocol '\(text)': expected v1, v2 or off")
                        }
                        return version
                    }
                }.map(locate)
            case .acceptProxy:
                fields.acceptProxy = boolean(value, key, at: valuePosition).map(locate)
            case .acceptProxyFrom:
                // An empty list is how a relay drops the list it would inherit.
                fields.acceptProxyFrom = list(value, key, at: valuePosition, elements: elements, emptyAllowed: true, CIDR.init(parsing:))
            case .proxyTimeout:
                fields.proxyTimeout = duration(value, key, at: valuePosition).map(locate)
            case .destinations:
                fields.destinations = list(value, key, at: valuePosition, elements: elements, emptyAllowed: true, DestinationRule.init(parsing:))
            case .transparent:
                fields.transparent = boolean(value, key, at: valuePosition).map(locate)
            }
        }
        return fields
    }

    /// The relay's spec from its own keys over the defaults, and whether it is valid. A key that
    /// is missing or wrong has been reported; the spec then holds a stand-in for it, so that the
    /// other keys are still checked and every problem is found in one pass.
    mutating func makeSpec(_ own: Fields, defaults: Fields, place: RelayPlace, relayCount: Int) -> (spec: RelaySpec, isValid: Bool) {
        let label = Candidate(name: own.name?.value, listen: nil, place: place).label
        // Keys without a usable value: missing where required, or present but wrong.
        var unusable: Set<RelayKey> = []
        for key in RelayKey.allCases {
            let ownWrong = own.present.contains(key) && !hasValue(key, own)
            let inheritedWrong = !own.present.contains(key) && defaults.present.contains(key) && !hasValue(key, defaults)
            if ownWrong || inheritedWrong { unusable.insert(key) }
        }
        // A misspelt key has been reported with its "did you mean"; do not report it missing too.
        if !own.present.contains(.name) && !own.suggested.contains(.name) && relayCount > 1 {
            report("\(label) has no name: add name = \"...\" (with several relays each needs one; it names the relay in logs and matches its socket-activated fd)", at: place.position)
            unusable.insert(.name)
        }
        if !own.present.contains(.listen) && !own.suggested.contains(.listen) {
            report("\(label) has no listen address: add listen = \"IP:PORT\" (or \"*:PORT\")", at: place.position)
            unusable.insert(.listen)
        }
        if !own.present.contains(.upstream) && !defaults.present.contains(.upstream)
            && !own.suggested.contains(.upstream) && !defaults.suggested.contains(.upstream) {
            report("\(label) has no upstream: add upstream = \"HOST:PORT\" (or a list of them)", at: place.position)
            unusable.insert(.upstream)
        }
        for key in own.suggested where !own.present.contains(key) { unusable.insert(key) }

        func pick<V>(_ path: KeyPath<Fields, Located<V>?>) -> Located<V>? { own[keyPath: path] ?? defaults[keyPath: path] }
        let standIn = HostPort(host: .ip(.loopbackV4), port: 1)
        let upstreams = pick(\.upstreams)
        // "original" comes with the upstream key it was read from: the relay's own, else the default.
        let original = (own.present.contains(.upstream) ? own.original : defaults.original)?.value ?? false
        let spec = RelaySpec(
            name: own.name?.value ?? "main",
            listen: own.listen?.value ?? standIn,
            upstreams: original ? [] : (upstreams?.value).flatMap { $0.isEmpty ? nil : $0 } ?? [standIn],
            egress: pick(\.egress)?.value ?? .samePort,
            onBusy: pick(\.onBusy)?.value ?? .queue,
            connectTimeout: pick(\.connectTimeout)?.value ?? RelaySpec.defaultConnectTimeout,
            idleTimeout: pick(\.idleTimeout)?.value ?? nil,
            keepalive: Keepalive(
                idle: pick(\.keepalive).map(\.value) ?? Keepalive.defaultIdle,
                interval: pick(\.keepaliveInterval)?.value ?? Keepalive.defaultInterval,
                count: pick(\.keepaliveCount)?.value ?? Keepalive.defaultCount,
                userTimeout: pick(\.userTimeout)?.value),
            maxPerClient: pick(\.maxPerClient)?.value ?? 0,
            maxConnections: pick(\.maxConnections)?.value ?? RelaySpec.defaultMaxConnections,
            queueLimit: pick(\.queueLimit)?.value ?? RelaySpec.defaultQueueLimit,
            bufferSize: pick(\.bufferSize)?.value ?? RelaySpec.defaultBufferSize,
            access: ClientAccess(allow: pick(\.allow)?.value ?? [], deny: pick(\.deny)?.value ?? []),
            splice: pick(\.splice)?.value ?? .on,
            pipeSize: pick(\.pipeSize)?.value ?? RelaySpec.defaultPipeSize,
            drainTimeout: pick(\.drainTimeout)?.value ?? RelaySpec.defaultDrainTimeout,
            proxyProtocol: pick(\.proxyProtocol)?.value ?? nil,
            acceptProxy: pick(\.acceptProxy)?.value ?? false,
            acceptProxyFrom: pick(\.acceptProxyFrom)?.value ?? [],
            proxyTimeout: pick(\.proxyTimeout)?.value ?? RelaySpec.defaultProxyTimeout,
            forwardsToOriginal: original,
            // Inherited destinations apply where upstream is "original"; a relay's own are checked.
            destinations: Destinations((original || own.destinations != nil ? pick(\.destinations)?.value : nil) ?? []),
            transparent: pick(\.transparent)?.value ?? false)

        var isValid = unusable.isEmpty
        for problem in spec.fieldProblems() {
            // A problem is reported at the key it is about, when that key has a value; a problem
            // that involves a key already reported as wrong or missing is left out.
            let position: SourcePosition?
            switch problem.field {
            case .name: position = own.name?.position
            case .listen: position = own.listen?.position
            case .upstream(let index):
                guard !unusable.contains(.destinations) else { continue }
                position = upstreams.map { $0.position(ofElement: index) } ?? nil
            case .upstreamIsListener(let index):
                guard unusable.isDisjoint(with: [.listen, .upstream]) else { continue }
                position = upstreams.map { $0.position(ofElement: index) } ?? nil
            case .egress:
                guard !unusable.contains(.listen), !unusable.contains(.egress) else { continue }
                position = pick(\.egress)?.position
            case .upstreamFamilies:
                guard unusable.isDisjoint(with: [.listen, .egress, .upstream]) else { continue }
                // At the relay's own upstream key, or at its listen address when it inherits them.
                position = own.upstreams?.position ?? own.listen?.position
            case .connectTimeout: position = pick(\.connectTimeout)?.position
            case .idleTimeout: position = pick(\.idleTimeout)?.position
            case .drainTimeout: position = pick(\.drainTimeout)?.position
            case .keepalive(.idle): position = pick(\.keepalive)?.position
            case .keepalive(.interval): position = pick(\.keepaliveInterval)?.position
            case .keepalive(.count): position = pick(\.keepaliveCount)?.position
            case .keepalive(.userTimeout): position = pick(\.userTimeout)?.position
            case .maxPerClient: position = pick(\.maxPerClient)?.position
            case .maxConnections: position = pick(\.maxConnections)?.position
            case .queueLimit: position = pick(\.queueLimit)?.position
            case .bufferSize: position = pick(\.bufferSize)?.position
            case .pipeSize: position = pick(\.pipeSize)?.position
            case .spliceAfter: position = nil  // not a key of the file
            case .acceptProxyFrom:
                guard unusable.isDisjoint(with: [.acceptProxy, .acceptProxyFrom]) else { continue }
                // Missing: at accept_proxy. Given without accept_proxy: at the relay's own list
                // only; a list in [defaults] is for the relays that turn accept_proxy on.
                position = spec.acceptProxy ? pick(\.acceptProxy)?.position : own.acceptProxyFrom?.position
            case .proxyTimeout: position = pick(\.proxyTimeout)?.position
            case .destinations:
                guard !unusable.contains(.destinations) else { continue }
                position = pick(\.destinations)?.position
            }
            guard let position else { continue }
            report(problem.message, at: position)
            isValid = false
        }
        return (spec, isValid)
    }

    private func hasValue(_ key: RelayKey, _ fields: Fields) -> Bool {
        switch key {
        case .name: return fields.name != nil
        case .listen: return fields.listen != nil
        case .upstream: return fields.upstreams?.isComplete == true
        case .egress: return fields.egress != nil
        case .onBusy: return fields.onBusy != nil
        case .connectTimeout: return fields.connectTimeout != nil
        case .idleTimeout: return fields.idleTimeout != nil
        case .keepalive: return fields.keepalive != nil
        case .keepaliveInterval: return fields.keepaliveInterval != nil
        case .keepaliveCount: return fields.keepaliveCount != nil
        case .userTimeout: return fields.userTimeout != nil
        case .drainTimeout: return fields.drainTimeout != nil
        case .maxConnections: return fields.maxConnections != nil
        case .maxPerClient: return fields.maxPerClient != nil
        case .queueLimit: return fields.queueLimit != nil
        case .bufferSize: return fields.bufferSize != nil
        case .allow: return fields.allow?.isComplete == true
        case .deny: return fields.deny?.isComplete == true
        case .splice: return fields.splice != nil
        case .pipeSize: return fields.pipeSize != nil
        case .proxyProtocol: return fields.proxyProtocol != nil
        case .acceptProxy: return fields.acceptProxy != nil
        case .acceptProxyFrom: return fields.acceptProxyFrom?.isComplete == true
        case .proxyTimeout: return fields.proxyTimeout != nil
        case .destinations: return fields.destinations?.isComplete == true
        case .transparent: return fields.transparent != nil
        }
    }

    /// A relay as compared with the others: its name and listen address when they were read.
    struct Candidate {
        var name: String?
        var listen: HostPort?
        var place: RelayPlace

        /// How problems name the relay: by its name, cut short if too long to repeat.
        var label: String {
            guard let name else { return "relay #\(place.index + 1)" }
            return "relay '\(Self.shortened(name))'"
        }

        /// " (line N)" after a label, where the relay is.
        var line: String { place.position.map { " (line \($0.line))" } ?? "" }

        static func shortened(_ name: String) -> String {
            name.unicodeScalars.count <= RelaySpec.maxNameLength ? name : String(name.prefix(32)) + "…"
        }
    }

    /// At most this many overlapping relays are named for one relay; a count says the rest.
    static let overlapsNamed = 8

    /// Duplicate names, and two relays that would listen on the same address: each relay is
    /// compared with the earlier ones through indices by name and by port, not pair by pair.
    mutating func checkAcrossRelays(_ relays: [Candidate]) {
        var firstWithName: [String: Int] = [:]
        for (index, relay) in relays.enumerated() {
            guard let name = relay.name else { continue }
            if let earlier = firstWithName[name] {
                report("duplicate relay name '\(Candidate.shortened(name))': relay #\(relays[earlier].place.index + 1)\(relays[earlier].line) already has it; give each relay its own name", at: relay.place.keyPosition(.name))
            } else {
                firstWithName[name] = index
            }
        }
        var ports: [UInt16: ListenIndex] = [:]
        for (index, relay) in relays.enumerated() {
            guard let listen = relay.listen else { continue }
            let earlier = ports[listen.port, default: ListenIndex()].overlapping(listen.host)
            let count = earlier.reduce(0) { $0 + $1.count }
            for other in earlier.flatMap({ $0.prefix(Self.overlapsNamed) }).sorted().prefix(Self.overlapsNamed) {
                let relayOther = relays[other]
                let how = relayOther.listen == listen
                    ? "as \(relayOther.label)\(relayOther.line) does"
                    : "which overlaps \(relayOther.label)\(relayOther.line) on \(relayOther.listen.map(\.description) ?? "")"
                report("\(relay.label) listens on \(listen), \(how); give each relay its own address or port", at: relay.place.keyPosition(.listen))
            }
            if count > Self.overlapsNamed {
                report("\(relay.label) listens on \(listen), which overlaps \(count - Self.overlapsNamed) relays besides the \(Self.overlapsNamed) named here; give each relay its own address or port", at: relay.place.keyPosition(.listen))
            }
            ports[listen.port, default: ListenIndex()].add(listen.host, index)
        }
    }

    /// The relays listening on one port, by host, for `overlapping`.
    struct ListenIndex {
        /// `*:P`.
        var wildcard: [Int] = []
        /// By exact host.
        var exact: [HostPort.Host: [Int]] = [:]
        /// `0.0.0.0:P` and `[::]:P`, and every IP address, by family (false: IPv4).
        var unspecified: [Bool: [Int]] = [:]
        var addresses: [Bool: [Int]] = [:]
        /// Every relay but the wildcards.
        var others: [Int] = []

        mutating func add(_ host: HostPort.Host, _ index: Int) {
            switch host {
            case .any:
                wildcard.append(index)
                return
            case .ip(let address):
                addresses[address.isIPv6, default: []].append(index)
                if address.isUnspecified { unspecified[address.isIPv6, default: []].append(index) }
            case .name:
                break
            }
            exact[host, default: []].append(index)
            others.append(index)
        }

        /// The relays on this port that `host` cannot be bound beside, as lists that share no
        /// relay, each in file order: the same address, or a wildcard that takes the other's
        /// address too (`*`, or the unspecified address of its family).
        func overlapping(_ host: HostPort.Host) -> [[Int]] {
            switch host {
            case .any:
                return [wildcard, others]
            case .ip(let address) where address.isUnspecified:
                return [wildcard, addresses[address.isIPv6] ?? []]
            case .ip(let address):
                return [wildcard, exact[host] ?? [], unspecified[address.isIPv6] ?? []]
            case .name:
                return [wildcard, exact[host] ?? []]
            }
        }
    }

    // MARK: Values

    mutating func string(_ value: TOMLNode, _ key: String, at position: SourcePosition?) -> String? {
        guard let text = value.string else {
            report("'\(key)' must be a string, not \(Self.describe(value.type))", at: position)
            return nil
        }
        return text
    }

    /// A string or a list of strings, each parsed by `parser`: the elements that parsed, with their
    /// positions, and whether every element did. Every bad element is reported.
    mutating func list<V, E: Error>(
        _ value: TOMLNode, _ key: String, at position: SourcePosition?, elements: [SourcePosition],
        emptyAllowed: Bool, _ parser: (String) throws(E) -> V
    ) -> Located<[V]>? {
        let items: [(TOMLNode, SourcePosition?)]
        if value.string != nil {
            items = [(value, position)]
        } else if let array = value.array {
            items = array.enumerated().map { index, element in (element, elements[safe: index] ?? position) }
        } else {
            report("'\(key)' must be a string or a list of strings, not \(Self.describe(value.type))", at: position)
            return nil
        }
        if items.isEmpty && !emptyAllowed {
            report("'\(key)' is an empty list: list at least one HOST:PORT", at: position)
            return nil
        }
        var parsed = Located<[V]>(value: [], position: position)
        for (index, (element, elementPosition)) in items.enumerated() {
            guard let text = element.string else {
                report("'\(key)' must list strings; element \(index + 1) is \(Self.describe(element.type))", at: elementPosition)
                parsed.isComplete = false
                continue
            }
            guard let item = parse(text, at: elementPosition, parser) else {
                parsed.isComplete = false
                continue
            }
            parsed.value.append(item)
            parsed.elements.append(elementPosition ?? position ?? .start)
        }
        return parsed
    }

    mutating func duration(_ value: TOMLNode, _ key: String, at position: SourcePosition?) -> Duration? {
        guard let text = value.string else {
            report("'\(key)' must be a duration string such as \"5s\" or \"250ms\", not \(Self.describe(value.type))", at: position)
            return nil
        }
        return parse(text, at: position) { text throws(DurationError) in try Duration(parsing: text) }
    }

    mutating func integer(_ value: TOMLNode, _ key: String, at position: SourcePosition?) -> Int? {
        guard value.type == .int, let number = value.int else {
            let hint = value.string.flatMap { Int($0) }.map { ": write \(key) = \($0), without quotes" } ?? ""
            report("'\(key)' must be an integer, not \(Self.describe(value.type))\(hint)", at: position)
            return nil
        }
        return number
    }

    mutating func boolean(_ value: TOMLNode, _ key: String, at position: SourcePosition?) -> Bool? {
        guard value.type == .bool, let on = value.bool else {
            report("'\(key)' must be true or false, not \(Self.describe(value.type))", at: position)
            return nil
        }
        return on
    }

    mutating func parse<V, E: Error>(_ text: String, at position: SourcePosition?, _ parser: (String) throws(E) -> V) -> V? {
        do {
            return try parser(text)
        } catch {
            report("\(error)", at: position)
            return nil
        }
    }

    /// For a syntax error on a line like `listen = 127.0.0.1:7000`, where a key that takes a string
    /// was given a bare value: a hint to quote it. Empty otherwise.
    static func quotingHint(line number: Int, in text: String) -> String {
        guard number >= 1 else { return "" }
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        guard number <= lines.count else { return "" }
        let parts = lines[number - 1].split(separator: "=", maxSplits: 1)
        guard parts.count == 2 else { return "" }
        let key = trimmingBlanks(parts[0])
        let value = trimmingBlanks(parts[1])
        let stringKeys: [RelayKey] = [
            .name, .listen, .upstream, .egress, .onBusy, .connectTimeout, .idleTimeout, .keepalive, .keepaliveInterval,
            .userTimeout, .drainTimeout, .allow, .deny, .proxyProtocol, .acceptProxyFrom, .proxyTimeout, .destinations,
        ]
        guard let relayKey = RelayKey(rawValue: key), stringKeys.contains(relayKey),
              let first = value.first, !"\"'[".contains(first) else { return "" }
        return "; \(key) takes a string: put the value in quotes, as in \(key) = \"\(value.split(separator: " ").first ?? "")\""
    }

    /// `text` without the spaces and tabs (any blank but a line end) at either end.
    private static func trimmingBlanks(_ text: Substring) -> String {
        let isBlank = { (character: Character) in character.isWhitespace && !character.isNewline }
        guard let start = text.firstIndex(where: { !isBlank($0) }), let end = text.lastIndex(where: { !isBlank($0) }) else { return "" }
        return String(text[start...end])
    }

    /// The position of a top-level table or key, from its header or its key line.
    func tablePosition(_ name: String) -> SourcePosition? {
        locator.table(name)?.position ?? locator.arrayElement(name, index: 0)?.position
            ?? locator.root?.keys[name]?.position
            ?? locator.tables.first { $0.path.first == name }?.position
    }

    static func describe(_ type: TOMLNode.Kind) -> String {
        switch type {
        case .string: return "a string"
        case .int: return "an integer"
        case .double: return "a floating-point number"
        case .bool: return "a boolean"
        case .date, .time, .dateTime: return "a date or time"
        case .array: return "a list"
        case .table: return "a table"
        }
    }

    /// The candidate `key` was most likely meant to be: the same words in another order
    /// (`timeout_connect`), or a near miss (`conect_timeout`, `idle-timeout`); nil if none is close.
    static func nearest(_ key: String, among candidates: [String]) -> String? {
        let normalized = String(key.lowercased().map { $0 == "-" ? "_" : $0 })
        let words = normalized.split(separator: "_").sorted()
        if let reordered = candidates.first(where: { $0.split(separator: "_").sorted() == words }) {
            return reordered
        }
        let scored = candidates.map { ($0, editDistance(normalized, $0)) }
        guard let (best, distance) = scored.min(by: { $0.1 < $1.1 }) else { return nil }
        // One edit in a short word already makes another word ("deny", "dest").
        return distance <= (best.count <= 5 ? 1 : max(2, best.count / 4)) ? best : nil
    }

    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a.unicodeScalars), b = Array(b.unicodeScalars)
        if a.isEmpty { return b.count }
        if b.isEmpty { return a.count }
        var previous = Array(0...b.count)
        for i in 1...a.count {
            var row = [i] + Array(repeating: 0, count: b.count)
            for j in 1...b.count {
                row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            previous = row
        }
        return previous[b.count]
    }
}

extension Array {
    subscript(safe index: Int) -> Element? {
        indices.contains(index) ? self[index] : nil
    }
}
