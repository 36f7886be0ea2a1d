import Glibc
import SamePortCore

/// A `Keepalive` as the values setsockopt(2) takes, worked out once per relay generation rather
/// than once per connection.
struct SocketKeepalive: Sendable {
    /// TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT; nil: keepalive off.
    let probes: (idle: Int32, interval: Int32, count: Int32)?
    /// TCP_USER_TIMEOUT in milliseconds; nil: none.
    let userTimeout: Int32?

    /// Whether there is anything to set.
    var isOn: Bool { probes != nil || userTimeout != nil }

    init(_ keepalive: Keepalive) {
        probes = keepalive.idle.map {
            (Int32(clamping: $0.components.seconds), Int32(clamping: keepalive.interval.components.seconds),
             Int32(clamping: keepalive.count))
        }
        userTimeout = keepalive.effectiveUserTimeout.map(Self.milliseconds)
    }

    private static func milliseconds(_ duration: Duration) -> Int32 {
        Int32(clamping: duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000)
    }
}

extension Socket {
    /// Sets SO_KEEPALIVE with TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT, and TCP_USER_TIMEOUT,
    /// as `keepalive` says (tcp(7)); set on the upstream socket of a connection that has relayed
    /// a second (the client socket has it from the listener), so that a peer that vanished frees
    /// its (egress, upstream) pair.
    ///
    /// Failures are ignored: the values were validated (`Keepalive.problems`) and the socket is a
    /// connected TCP socket, and a connection without keepalive still works.
    func setKeepalive(_ keepalive: SocketKeepalive) {
        let tcp = Int32(IPPROTO_TCP)
        if let probes = keepalive.probes {
            try? setOption(level: SOL_SOCKET, name: SO_KEEPALIVE, value: 1)
            try? setOption(level: tcp, name: TCP_KEEPIDLE, value: probes.idle)
            try? setOption(level: tcp, name: TCP_KEEPINTVL, value: probes.interval)
            try? setOption(level: tcp, name: TCP_KEEPCNT, value: probes.count)
        }
        if let userTimeout = keepalive.userTimeout {
            try? setOption(level: tcp, name: TCP_USER_TIMEOUT, value: userTimeout)
        }
    }

    /// The same on a listening socket, for the clients it accepts: Linux copies SO_KEEPALIVE, the
    /// three keepalive values and TCP_USER_TIMEOUT to every accepted socket (and starts its
    /// keepalive timer), which saves five setsockopt calls per client. Set explicitly either way,
    /// so that a reload that turns keepalive off, or a socket from systemd with its own
    /// KeepAlive=, ends up as the relay's settings say.
    func setKeepaliveForClients(_ keepalive: Keepalive) {
        let settings = SocketKeepalive(keepalive)
        setKeepalive(settings)
        if settings.probes == nil { try? setOption(level: SOL_SOCKET, name: SO_KEEPALIVE, value: 0) }
        if settings.userTimeout == nil { try? setOption(level: Int32(IPPROTO_TCP), name: TCP_USER_TIMEOUT, value: 0) }
    }
}
