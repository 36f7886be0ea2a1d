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
            let milliseconds = userTimeout.components.seconds * 1000 + userTimeout.components.attoseconds / 1_000_000_000_000_000
            try? setOption(level: Int32(IPPROTO_TCP), name: TCP_USER_TIMEOUT, value: Int32(clamping: milliseconds))
        }
    }
}
