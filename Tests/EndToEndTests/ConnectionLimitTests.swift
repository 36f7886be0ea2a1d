import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// `--max-connections`: the relay holds at most that many clients (open or queued); the rest
/// wait in the kernel's accept queue, and are taken as connections end.
@Suite("Connection limit", .serialized)
struct ConnectionLimitTests {
    @Test("a burst of clients never holds more than the limit, and each is served in turn")
    func burstStaysWithinTheLimit() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        // Ephemeral egress: no 4-tuple queueing, so only the limit holds clients back.
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description], ["--egress", "ephemeral", "--max-connections", "3"])
        defer { relay.stop() }
        // Twelve clients at once: the kernel completes every handshake; the relay takes three.
        var clients: [TestSocket] = []
        defer { for client in clients { client.close() } }
        for index in 0..<12 {
            let client = try TestSocket.connect(to: listen)
            try client.sendAll(Array("client \(index)\n".utf8))
            clients.append(client)
        }
        #expect(waitUntil(timeout: .seconds(5)) { upstream.activeConnections == 3 })
        usleep(300_000)
        #expect(upstream.activeConnections == 3, "the relay holds at most --max-connections clients")
        #expect(upstream.peers.count == 3)
        // Each client closed lets exactly one more in; all are answered, in order of arrival.
        for (index, client) in clients.enumerated() {
            let text = Array("client \(index)\n".utf8)
            #expect(try client.receive(exactly: text.count, timeout: .seconds(5)).bytes == text, "client \(index)")
            client.close()
            if index + 3 < clients.count {
                #expect(waitUntil(timeout: .seconds(5)) { upstream.peers.count == index + 4 })
            }
            #expect(upstream.activeConnections <= 3)
        }
        #expect(upstream.peers.count == 12)
    }
}
