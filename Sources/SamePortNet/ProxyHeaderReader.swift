import CSamePortShims
import Dispatch
import SamePortCore

/// Reads the PROXY protocol header that a trusted proxy sends ahead of its client's bytes, before
/// the relay does anything else with the client (`accept_proxy`): no allow/deny, no upstream, no
/// queue until the header is whole.
///
/// Design note: the header is looked at with recv(MSG_PEEK) and parsed whole each time more bytes
/// arrive (each arrival raises a new edge of the shard's edge-triggered registration), and taken
/// from the socket only once a prefix is a complete header, exactly its bytes. The client's own
/// bytes after it stay in the kernel for the pump, whichever path that takes (copy or splice):
/// nothing of the client is buffered here, reordered or lost, and a refused header leaves nothing
/// that could reach an upstream. A peek is bounded by `ProxyHeaderParser.maximumLength` (4112 bytes,
/// the most the parser ever needs to decide) and goes to the shard thread's scratch buffer, so a
/// client reading its header costs this object and nothing more.
///
/// Concurrency: lives on the shard that accepted its client, like a `Connection`. It registers the
/// client's socket in the shard's epoll set and a deadline (`proxy_timeout`, from the accept), and
/// removes both before it hands the client back to the relay: `Relay.headerRead` serves the client
/// as if it had just been accepted, with the announced addresses; `Relay.headerFailed` closes it
/// with its log line.
final class ProxyHeaderReader: EventHandler, DeadlineHandler, @unchecked Sendable {  // confined to its shard
    /// The client, with the announced addresses once the header is read.
    private(set) var arrival: Relay.Arrival
    private let relay: Relay
    private let timeout: Duration
    private var registration: UInt64 = 0
    private var finished = false
    var deadlineIndex = -1
    var deadline: UInt64 = 0

    init(_ arrival: Relay.Arrival, relay: Relay, timeout: Duration) {
        self.arrival = arrival
        self.relay = relay
        self.timeout = timeout
    }

    var loop: EventLoop { arrival.loop }

    /// Starts waiting for the header; on the arrival's shard.
    func start() {
        do {
            registration = try loop.registerSocket(arrival.client, handler: self, tag: 0)
        } catch {
            return fail(.failed(cause: "client: \(error)"))
        }
        loop.setDeadline(self, at: arrival.acceptedAt &+ UInt64(max(0, timeout.nanoseconds)))
        // The registration reports what is already there as an event too: this only saves a turn.
        readHeader(closing: false)
    }

    /// Ends the wait: the relay is stopping; on the arrival's shard.
    func stop() {
        fail(.shutdown)
    }

    func handle(events: UInt32, tag: UInt8) {
        readHeader(closing: events & (sameport_epollrdhup | sameport_epollhup | sameport_epollerr) != 0)
    }

    func deadlineReached(now: UInt64) {
        guard !finished else { return }
        let received = peekedCount() ?? 0
        fail(.badProxyHeader(cause: "no complete PROXY header within \(timeout.shortDescription) (\(received) byte\(received == 1 ? "" : "s") received)"))
    }

    /// Peeks at what the client sent and decides, or waits for more.
    ///
    /// - Parameter closing: the event said the client has closed (EPOLLRDHUP) or failed: what the
    ///   socket holds is all there will be. Bytes sent before a FIN are queued before it, so a
    ///   peek then sees every one of them.
    private func readHeader(closing: Bool) {
        guard !finished else { return }
        guard let scratch = ScratchBuffer.current(size: ProxyHeaderParser.maximumLength) else {
            return fail(.failed(cause: "no memory for a PROXY header"))
        }
        let count: Int
        do {
            switch try arrival.client.peek(into: scratch) {
            case .processed(let peeked): count = peeked
            case .wouldBlock:
                // Nothing yet. A reset or close without bytes shows as an error or EOF here.
                return
            }
        } catch {
            return fail(error.errno == .connectionReset ? .clientReset : .failed(cause: "client: \(error)"))
        }
        guard count > 0 else {
            return fail(.badProxyHeader(cause: "truncated PROXY header: the client closed before sending one"))
        }
        switch ProxyHeaderParser.parse(UnsafeRawBufferPointer(rebasing: scratch[0..<count])) {
        case .needMore:
            if closing {
                fail(.badProxyHeader(cause: "truncated PROXY header: the client closed after \(count) byte\(count == 1 ? "" : "s")"))
            }
        case .invalid(let reason):
            fail(.badProxyHeader(cause: reason))
        case .header(let header, let length):
            guard arrival.client.discard(length, using: scratch) else {
                return fail(.clientReset)
            }
            if let addresses = header.addresses, !header.isLocal {
                arrival.clientEndpoint = addresses.source.unmapped
                arrival.reached = addresses.destination.unmapped
            }
            finish()
            relay.headerRead(self)
        }
    }

    /// How many bytes the client has sent so far (for the timeout's line).
    private func peekedCount() -> Int? {
        guard let scratch = ScratchBuffer.current(size: ProxyHeaderParser.maximumLength),
              case .processed(let count)? = try? arrival.client.peek(into: scratch) else { return nil }
        return count
    }

    /// Leaves the shard's epoll set and deadlines: the socket goes back to the relay.
    private func finish() {
        finished = true
        loop.cancelDeadline(self)
        if registration != 0 { loop.deregister(fd: arrival.client.fd, id: registration) }
        registration = 0
    }

    private func fail(_ end: ConnectionEnd) {
        guard !finished else { return }
        finish()
        relay.headerFailed(self, end)
    }
}
