import SamePortCore
import Testing

@Suite("ConnectionEnd")
struct ConnectionEndTests {
    @Test(
        "labels and causes",
        arguments: [
            (ConnectionEnd.completed, "completed", String?.none),
            (.clientReset, "client-reset", nil),
            (.upstreamReset, "upstream-reset", nil),
            (.idleTimeout, "idle-timeout", nil),
            (.connectFailed(cause: "connection refused"), "connect-failed", "connection refused"),
            (.busyRejected, "busy-rejected", "every upstream is in use from this egress ip:port (on-busy reject)"),
            (.queueTimeout, "queue-timeout", "no upstream became free within the connect timeout (one connection per upstream from one ip:port: add upstreams, or use --on-busy ephemeral)"),
            (.queueFull, "queue-full", "the queue of clients waiting for a free upstream is full"),
            (.shutdown, "shutdown", nil),
            (.failed(cause: "broken pipe"), "error", "broken pipe"),
        ]
    )
    func labelAndCause(end: ConnectionEnd, label: String, cause: String?) {
        #expect(end.label == label)
        #expect(end.cause == cause)
    }

    @Test("an upstream reset and every failure to serve reset the client; ends after relaying do not")
    func resetsClient() {
        let resetting: [ConnectionEnd] = [
            .upstreamReset, .connectFailed(cause: "x"), .busyRejected, .queueTimeout, .queueFull,
            .refused(cause: "denied"), .failed(cause: "y"), .clientLimit(limit: 2), .badProxyHeader(cause: "z"),
        ]
        for end in resetting {
            #expect(end.resetsClient, "\(end)")
        }
        for end: ConnectionEnd in [.completed, .clientReset, .idleTimeout, .shutdown] {
            #expect(!end.resetsClient, "\(end)")
        }
    }

    @Test("labels are distinct")
    func distinctLabels() {
        let all: [ConnectionEnd] = [
            .completed, .clientReset, .upstreamReset, .idleTimeout, .connectFailed(cause: ""), .busyRejected,
            .queueTimeout, .queueFull, .shutdown, .failed(cause: ""),
        ]
        #expect(Set(all.map(\.label)).count == all.count)
    }
}

@Suite("Backoff")
struct BackoffTests {
    @Test("doubles from 5ms and caps at 250ms")
    func defaults() {
        var backoff = Backoff()
        let delays = (0..<10).map { _ in backoff.nextDelay() }
        #expect(
            delays == [5, 10, 20, 40, 80, 160, 250, 250, 250, 250].map { Duration.milliseconds($0) }
        )
    }

    @Test("delay(retry:) is what nextDelay returns at that retry: 200 us doubling to 50 ms, as connections back off")
    func byRetryCount() {
        var backoff = Backoff(initial: .microseconds(200), maximum: .milliseconds(50))
        for retry in 0..<40 as Range<UInt32> {
            #expect(Backoff.delay(retry: retry, initial: .microseconds(200), maximum: .milliseconds(50)) == backoff.nextDelay())
        }
        #expect(Backoff.delay(retry: 8, initial: .microseconds(200), maximum: .milliseconds(50)) == .milliseconds(50))
        #expect(Backoff.delay(retry: 7, initial: .microseconds(200), maximum: .milliseconds(50)) == .microseconds(25_600))
    }

    @Test("custom initial and maximum")
    func custom() {
        var backoff = Backoff(initial: .milliseconds(100), maximum: .milliseconds(300))
        let delays = (0..<4).map { _ in backoff.nextDelay() }
        #expect(delays == [.milliseconds(100), .milliseconds(200), .milliseconds(300), .milliseconds(300)])
    }

    @Test("copies advance independently")
    func valueSemantics() {
        var original = Backoff()
        #expect(original.nextDelay() == .milliseconds(5))
        var copy = original
        #expect(copy.nextDelay() == .milliseconds(10))
        #expect(copy.nextDelay() == .milliseconds(20))
        #expect(original.nextDelay() == .milliseconds(10))
    }
}
