import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Synchronization
import Testing

/// File descriptors and libdispatch under many connections.
@Suite("Resources", .serialized)
struct ResourceTests {
    /// One short exchange through the relay: send, read the echo, close.
    private static func exchange(_ listen: Endpoint, _ payload: [UInt8], timeout: Duration = .seconds(30)) throws {
        let client = try TestSocket.connect(to: listen, timeout: timeout)
        defer { client.close() }
        try client.sendAll(payload, timeout: timeout)
        let reply = try client.receive(exactly: payload.count, timeout: timeout)
        guard reply.bytes == payload else {
            throw TestError.failed("echo mismatch: \(reply.bytes.count) bytes, end \(String(describing: reply.end))")
        }
    }

    /// Waits for `count` connection-ended lines, then for the fd count to settle at `baseline`.
    private func expectSettled(_ relay: RelayProcess, ended count: Int, baseline: Int) throws {
        let lines = try relay.waitForLines(containing: "connection ended", count: count, timeout: .seconds(60))
        #expect(lines.count == count)
        #expect(lines.allSatisfy { field("end", in: $0) == "completed" }, "\(lines.filter { field("end", in: $0) != "completed" }.prefix(3))")
        #expect(waitUntil(timeout: .seconds(10)) { relay.openFileDescriptors() == baseline },
                "fds: \(relay.openFileDescriptors()) vs baseline \(baseline): \(Self.descriptors(relay))")
        print("resources: \(count) connections ended; relay fds \(relay.openFileDescriptors()) (baseline \(baseline)), RSS \(relay.residentKiB()) KiB")
    }

    /// What each open descriptor of the relay is, for a failure message.
    private static func descriptors(_ relay: RelayProcess) -> String {
        let directory = "/proc/\(relay.pid)/fd"
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return entries.sorted { (Int($0) ?? 0) < (Int($1) ?? 0) }.map { entry in
            "\(entry)->\((try? FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/\(entry)")) ?? "?")"
        }.joined(separator: " ")
    }

    /// Starts echo upstreams and a relay to them, runs one connection through so that threads and
    /// the allocator are warm, and returns the relay's fd count at that point.
    private func warmRelay(upstreamCount: Int, _ extra: [String] = []) throws
        -> (relay: RelayProcess, listen: Endpoint, upstreams: [TestServer], baseline: Int)
    {
        let upstreams = try (0..<upstreamCount).map { _ in try TestServer(handler: TestServer.echo) }
        let (relay, listen) = try startRelay(upstreams: upstreams.map(\.endpoint.description), extra)
        try Self.exchange(listen, Array("warm-up".utf8))
        try relay.waitForLines(containing: "connection ended")
        // libdispatch opens its timer descriptor on its manager thread, once the shards' timers
        // are first armed at start-up (20 ms): count after that.
        usleep(100_000)
        return (relay, listen, upstreams, relay.openFileDescriptors())
    }

    @Test("A closed connection's sockets are closed before its line is logged: no descriptor is held after the end")
    func closedAtOnce() throws {
        let (relay, listen, upstreams, baseline) = try warmRelay(upstreamCount: 1)
        defer { relay.stop(); upstreams.forEach { $0.stop() } }
        for round in 2...11 {
            try Self.exchange(listen, Array("close".utf8))
            try relay.waitForLines(containing: "connection ended", count: round)
            // Read right after the line: no grace period, no parked numbers.
            #expect(relay.openFileDescriptors() == baseline, "fds: \(relay.openFileDescriptors()) vs baseline \(baseline)")
        }
        #expect(relay.openFileDescriptors(linkingTo: ["/dev/null"]) <= 3)
    }

    @Test("Out of descriptors: accepting pauses, logged once with a count rather than ten times a second, and the waiting clients are served once descriptors are free")
    func acceptPausesLoggedOnce() throws {
        // Copied, not spliced: no pipes, so a connection takes two descriptors on either test path.
        let (relay, listen, upstreams, _) = try warmRelay(upstreamCount: 1, ["--threads", "1", "--egress", "ephemeral", "--splice", "off"])
        defer { relay.stop(); upstreams.forEach { $0.stop() } }
        // Room for two connections (a client and an upstream socket each), no more.
        try relay.limitDescriptors(leavingFree: 4)
        let held = try (0..<2).map { index -> TestSocket in
            let client = try TestSocket.connect(to: listen)
            let line = Array("held \(index)\n".utf8)
            try client.sendAll(line)
            #expect(try client.receive(exactly: line.count, timeout: .seconds(10)).bytes == line)
            return client
        }
        // These wait in the listen backlog: accept4 fails with EMFILE, and the relay pauses
        // accepting for 100 ms at a time, twenty times in two seconds.
        let waiting = try (0..<2).map { _ in try TestSocket.connect(to: listen) }
        for client in waiting { try client.sendAll(Array("waiting\n".utf8)) }
        usleep(2_000_000)
        let paused = relay.lines(containing: "accept paused")
        #expect(paused.count == 1, "\(paused.count) lines: \(paused.prefix(3))")
        #expect(paused.first?.contains("Too many open files") == true, "\(paused)")
        for client in held { client.close() }
        for client in waiting {
            #expect(try client.receive(exactly: 8, timeout: .seconds(10)).bytes == Array("waiting\n".utf8))
            client.close()
        }
    }

    @Test("Open fds return to the baseline after 1,000 sequential connections")
    func sequential() throws {
        let (relay, listen, upstreams, baseline) = try warmRelay(upstreamCount: 1)
        defer { relay.stop(); upstreams.forEach { $0.stop() } }
        for index in 0..<1000 {
            try Self.exchange(listen, Array("connection \(index)".utf8))
        }
        try expectSettled(relay, ended: 1001, baseline: baseline)
    }

    @Test("Open fds return to the baseline after 200 concurrent connections over 50 upstream ports")
    func concurrent() throws {
        let (relay, listen, upstreams, baseline) = try warmRelay(
            upstreamCount: 50, ["--queue-limit", "200", "--connect-timeout", "30s"])
        defer { relay.stop(); upstreams.forEach { $0.stop() } }
        // All 200 open at once: 50 are served, 150 queue for a free (ip:P, upstream) pair.
        let clients = try (0..<200).map { _ in try TestSocket.connect(to: listen) }
        for (index, client) in clients.enumerated() {
            try client.sendAll(Array("client \(index)\n".utf8))
        }
        #expect(waitUntil(timeout: .seconds(10)) { upstreams.reduce(0) { $0 + $1.activeConnections } == 50 })
        // Each echo is read as it comes, and its client closed, which frees a pair for the next
        // in the queue. Not in the order the clients connected: the shards accept outside the
        // relay's lock, so a shard preempted between accept4 and the lock admits its client after
        // later ones, and a client waiting for an earlier one's echo would wait for ever.
        var pending = Array(clients.enumerated())
        let deadline = ContinuousClock.now + .seconds(60)
        while !pending.isEmpty, ContinuousClock.now < deadline {
            var polled = pending.map { pollfd(fd: $0.element.fd, events: Int16(POLLIN), revents: 0) }
            _ = Glibc.poll(&polled, nfds_t(polled.count), 100)
            var waiting: [(offset: Int, element: TestSocket)] = []
            for (entry, poll) in zip(pending, polled) {
                guard poll.revents != 0 else {
                    waiting.append(entry)
                    continue
                }
                let expected = Array("client \(entry.offset)\n".utf8)
                #expect(try entry.element.receive(exactly: expected.count, timeout: .seconds(10)).bytes == expected)
                entry.element.close()
            }
            pending = waiting
        }
        #expect(pending.isEmpty, "\(pending.count) clients got no echo within 60 s")
        try expectSettled(relay, ended: 201, baseline: baseline)
        #expect(upstreams.allSatisfy { $0.peers.allSatisfy { $0 == listen } })
    }

    @Test("Churn: 5,000 short connections, 32 at a time, across 32 upstream ports")
    func churn() throws {
        let (relay, listen, upstreams, baseline) = try warmRelay(
            upstreamCount: 32, ["--queue-limit", "64", "--connect-timeout", "30s"])
        defer { relay.stop(); upstreams.forEach { $0.stop() } }
        let failures = Mutex<[String]>([])
        let perWorker = 5000 / 32 + 1
        let workers = (0..<32).map { worker in
            Background {
                for index in 0..<perWorker where worker * perWorker + index < 5000 {
                    do {
                        try Self.exchange(listen, Array("w\(worker) c\(index) ".utf8) + [UInt8](repeating: 0x41, count: 64))
                    } catch {
                        failures.withLock { $0.append("worker \(worker) connection \(index): \(error)") }
                    }
                }
            }
        }
        #expect(workers.allSatisfy { $0.join(timeout: .seconds(300)) })
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0.prefix(5) })")
        #expect(relay.isRunning)
        try expectSettled(relay, ended: 5001, baseline: baseline)
    }
}
