/// TCP keepalive and TCP_USER_TIMEOUT, set on both sockets of every connection: how a peer that
/// vanished (a cable pulled, a NAT mapping dropped) is noticed, so that its (egress, upstream)
/// pair is freed instead of being held for ever.
///
/// Keepalive probes an idle connection: after `idle` without traffic, a probe every `interval`;
/// `count` unanswered probes end it. TCP_USER_TIMEOUT bounds how long sent bytes may stay
/// unacknowledged, which keepalive does not cover (a peer that vanished while bytes were in flight
/// is otherwise retransmitted to for some 15 minutes), and, once set, also replaces `count` as the
/// bound on probing (tcp(7)). So by default it is the same bound: idle + interval x count. Since
/// Linux 5.11 it also ends a connection whose receiver keeps its window shut for that long while
/// bytes wait for it (measured here: a client that read nothing was dropped at the user timeout).
public struct Keepalive: Sendable, Equatable, CustomStringConvertible {
    /// Idle time before the first probe (TCP_KEEPIDLE); nil: keepalive off.
    public var idle: Duration?
    /// Time between probes (TCP_KEEPINTVL).
    public var interval: Duration
    /// Unanswered probes before the connection is dropped (TCP_KEEPCNT).
    public var count: Int
    /// TCP_USER_TIMEOUT as given: nil for the default (`bound`), zero for off.
    public var userTimeout: Duration?

    public static let defaultIdle = Duration.seconds(60)
    public static let defaultInterval = Duration.seconds(10)
    public static let defaultCount = 6

    public init(
        idle: Duration? = Keepalive.defaultIdle, interval: Duration = Keepalive.defaultInterval,
        count: Int = Keepalive.defaultCount, userTimeout: Duration? = nil
    ) {
        self.idle = idle
        self.interval = interval
        self.count = count
        self.userTimeout = userTimeout
    }

    /// The longest a vanished, idle peer keeps its connection: idle + interval x count; nil when
    /// keepalive is off.
    public var bound: Duration? {
        idle.map { $0 + interval * count }
    }

    /// The TCP_USER_TIMEOUT to set, nil for none: the one given (0 turns it off), or `bound`.
    public var effectiveUserTimeout: Duration? {
        guard let userTimeout else { return bound }
        return userTimeout == .zero ? nil : userTimeout
    }

    /// A field of `Keepalive` with a problem.
    public enum Field: Sendable, Equatable {
        case idle, interval, count, userTimeout
    }

    /// Every problem, with its field and a message naming the value and the fix.
    public func problems() -> [(field: Field, message: String)] {
        var problems: [(Field, String)] = []
        // The kernel takes these two in whole seconds, up to 32767 (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL).
        func wholeSeconds(_ duration: Duration, _ key: String, _ field: Field, _ note: String = "") {
            let (seconds, attoseconds) = duration.components
            if attoseconds != 0 || !(1...32767).contains(seconds) {
                problems.append((field, "\(key) must be whole seconds from 1s to 32767s (the kernel counts it in seconds\(note)), not \(duration.shortDescription)"))
            }
        }
        if let idle {
            wholeSeconds(idle, "the keepalive idle time", .idle, "; 0 turns keepalive off")
        }
        wholeSeconds(interval, "the keepalive interval", .interval)
        if !(1...127).contains(count) {
            problems.append((.count, "the keepalive probe count must be from 1 to 127, not \(count)"))
        }
        if let userTimeout, userTimeout < .zero || userTimeout > .milliseconds(Int64(Int32.max)) {
            problems.append((.userTimeout, "the user timeout must be from 0 (off) to 596h (TCP_USER_TIMEOUT counts milliseconds in 31 bits), not \(userTimeout.shortDescription)"))
        }
        return problems
    }

    /// For `check`: `60s+10sx6`, or `off`, then `,user=90s` when the user timeout differs from
    /// the keepalive bound.
    public var description: String {
        let probing = idle.map { "\($0.shortDescription)+\(interval.shortDescription)x\(count)" } ?? "off"
        let user = effectiveUserTimeout
        if user == bound { return probing }
        return "\(probing),user=\(user?.shortDescription ?? "off")"
    }
}
