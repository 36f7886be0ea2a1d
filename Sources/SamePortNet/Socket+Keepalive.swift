import Glibc
import SamePortCore

extension Socket {
    /// Sets SO_KEEPALIVE with TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT, and TCP_USER_TIMEOUT,
    /// as `keepalive` says (tcp(7)); set on both sockets of a connection once it is connected, so
    /// that a peer that vanished frees its (egress, upstream) pair.
    ///
    /// Failures are ignored: the values were validated (`Keepalive.problems`) and the socket is a
    /// connected TCP socket, and a connection without keepalive still works.
    func setKeepalive(_ keepalive: Keepalive) {
        if let idle = keepalive.idle {
            let tcp = Int32(IPPROTO_TCP)
            try? setOption(level: SOL_SOCKET, name: SO_KEEPALIVE, value: 1)
            try? setOption(level: tcp, name: TCP_KEEPIDLE, value: Int32(clamping: idle.components.seconds))
            try? setOption(level: tcp, name: TCP_KEEPINTVL, value: Int32(clamping: keepalive.interval.components.seconds))
            try? setOption(level: tcp, name: TCP_KEEPCNT, value: Int32(clamping: keepalive.count))
        }
        if let userTimeout = keepalive.effectiveUserTimeout {
            try? setOption(level: Int32(IPPROTO_TCP), name: TCP_USER_TIMEOUT, value: Self.milliseconds(userTimeout))
        }
    }

    /// The same on a listening socket, for the clients it accepts: Linux copies SO_KEEPALIVE, the
    /// three keepalive values and TCP_USER_TIMEOUT to every accepted socket (and starts its
    /// keepalive timer), which saves five setsockopt calls per client. Set explicitly either way,
    /// so that a reload that turns keepalive off, or a socket from systemd with its own
    /// KeepAlive=, ends up as the relay's settings say.
    func setKeepaliveForClients(_ keepalive: Keepalive) {
        setKeepalive(keepalive)
        if keepalive.idle == nil { try? setOption(level: SOL_SOCKET, name: SO_KEEPALIVE, value: 0) }
        if keepalive.effectiveUserTimeout == nil { try? setOption(level: Int32(IPPROTO_TCP), name: TCP_USER_TIMEOUT, value: 0) }
    }

    private static func milliseconds(_ duration: Duration) -> Int32 {
        Int32(clamping: duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000)
    }
}
