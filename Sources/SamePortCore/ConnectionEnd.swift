/// How a client connection ended: the `end=` field of its log line.
public enum ConnectionEnd: Hashable, Sendable {
    /// Both directions reached EOF and every byte was delivered.
    case completed
    /// The client reset the connection; the upstream was reset in turn.
    case clientReset
    /// The upstream reset the connection; the client was reset in turn.
    case upstreamReset
    /// Neither side sent anything for the idle timeout.
    case idleTimeout
    /// No connection to any upstream address could be made; `cause` says why.
    case connectFailed(cause: String)
    /// Every upstream was in use from this egress and the busy policy is `reject`.
    case busyRejected
    /// The client waited for a free upstream longer than the connect timeout.
    case queueTimeout
    /// The wait queue was full.
    case queueFull
    /// The client's address already held `limit` connections (max_per_client).
    case clientLimit(limit: Int)
    /// The client's address is denied, or not allowed, by the relay's allow/deny lists.
    case refused(cause: String)
    /// The client's PROXY protocol header was malformed, truncated, oversized or late (accept_proxy);
    /// `cause` names the problem. Nothing of the client reached an upstream.
    case badProxyHeader(cause: String)
    /// The relay was stopping.
    case shutdown
    /// A socket error other than a reset; `cause` names it.
    case failed(cause: String)

    /// The short label logged as `end=`.
    public var label: String {
        switch self {
        case .completed: return "completed"
        case .clientReset: return "client-reset"
        case .upstreamReset: return "upstream-reset"
        case .idleTimeout: return "idle-timeout"
        case .connectFailed: return "connect-failed"
        case .busyRejected: return "busy-rejected"
        case .queueTimeout: return "queue-timeout"
        case .queueFull: return "queue-full"
        case .clientLimit: return "client-limit"
        case .refused: return "refused"
        case .badProxyHeader: return "bad-proxy-header"
        case .shutdown: return "shutdown"
        case .failed: return "error"
        }
    }

    /// The cause behind a failure, when there is one.
    public var cause: String? {
        switch self {
        case .connectFailed(let cause), .failed(let cause), .refused(let cause), .badProxyHeader(let cause): return cause
        case .busyRejected: return "every upstream is in use from this egress ip:port (on-busy reject)"
        case .queueTimeout:
            return "no upstream became free within the connect timeout (one connection per upstream from one ip:port: add upstreams, or use --on-busy ephemeral)"
        case .queueFull: return "the queue of clients waiting for a free upstream is full"
        case .clientLimit(let limit):
            return "this client address holds \(limit) connection\(limit == 1 ? "" : "s") already, the relay's max_per_client"
        default: return nil
        }
    }

    /// True when the relay resets (RST) rather than closes (FIN) the client whatever was relayed
    /// before: the upstream reset, or the client was never served. To a protocol where the server
    /// speaks first, a FIN after nothing looks like an empty, successful session.
    public var resetsClient: Bool {
        switch self {
        case .upstreamReset, .connectFailed, .busyRejected, .queueTimeout, .queueFull, .clientLimit, .refused, .badProxyHeader,
             .failed: true
        case .completed, .clientReset, .idleTimeout, .shutdown: false
        }
    }
}

/// Exponential backoff for retrying a connect that the kernel refused with EADDRNOTAVAIL.
public struct Backoff: Sendable {
    private var next: Duration
    private let maximum: Duration

    public init(initial: Duration = .milliseconds(5), maximum: Duration = .milliseconds(250)) {
        self.next = initial
        self.maximum = maximum
    }

    /// The next delay: doubling from the initial one up to the maximum.
    public mutating func nextDelay() -> Duration {
        defer { next = min(next * 2, maximum) }
        return next
    }

    /// The delay before retry number `retry` (0 first), doubling from `initial` up to `maximum`:
    /// what `nextDelay` returns on its `retry + 1`th call, for a caller that keeps only a count.
    public static func delay(retry: UInt32, initial: Duration, maximum: Duration) -> Duration {
        min(initial * (1 << Int(min(retry, 30))), maximum)
    }
}
