import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// What an upstream received on one connection: the bytes up to the client's EOF.
private struct Received: Sendable {
    var peer: Endpoint?
    var bytes: [UInt8]
}

/// An upstream that reads each connection to EOF, records it, answers "ok\n" and closes.
private func recordingUpstream(_ endpoint: Endpoint = Endpoint(.loopbackV4, 0)) throws -> (server: TestServer, received: Locked<[Received]>) {
    let received = Locked<[Received]>([])
    let server = try TestServer(endpoint) { socket in
        let (bytes, _) = (try? socket.receiveToEnd(timeout: .seconds(30))) ?? ([], .timeout)
        let peer = socket.peerEndpoint
        received.withLock { $0.append(Received(peer: peer, bytes: bytes)) }
        try? socket.sendAll(Array("ok\n".utf8))
    }
    return (server, received)
}

/// Sends `bytes` from `client`, half-closes, and reads the answer to the end.
private func exchange(_ client: TestSocket, _ bytes: [UInt8]) throws -> (bytes: [UInt8], end: TestSocket.End) {
    try client.sendAll(bytes, timeout: .seconds(30))
    client.shutdownWrite()
    return try client.receiveToEnd(timeout: .seconds(30))
}

private func checksum(_ bytes: some Collection<UInt8>) -> Checksum {
    var sum = Checksum()
    Array(bytes).withUnsafeBytes { sum.add($0) }
    return sum
}

/// A PROXY header announcing `source` → `destination` (`ProxyHeader.encoded`, unit-tested
/// against the specification's bytes in SamePortCoreTests).
private func header(_ version: ProxyProtocolVersion, _ source: String, _ destination: String) throws -> [UInt8] {
    let source = try HostPort(parsing: source), destination = try HostPort(parsing: destination)
    let addresses = try ProxyAddresses(source: #require(source.endpoint), destination: #require(destination.endpoint))
    return ProxyHeader(version: version, addresses: addresses).encoded()
}

/// The PROXY protocol on loopback: headers written to the upstream (v1 and v2, IPv4 and IPv6),
/// headers read from clients (the announced client judged by allow/deny, logged and announced on),
/// refused senders, and every class of bad header. Runs on the path SAMEPORT_TEST_SPLICE picks
/// (splice from the first byte by default, `off` for read/write).
@Suite("PROXY protocol", .serialized)
struct ProxyProtocolTests {
    @Test("proxy_protocol v1/v2, IPv4/IPv6: the upstream reads a header naming the client's ip:port and the relay's listen ip:port, then the client's bytes intact",
          arguments: [(ProxyProtocolVersion.v1, false), (.v1, true), (.v2, false), (.v2, true)])
    func send(version: ProxyProtocolVersion, ipv6: Bool) throws {
        let host: IPAddress = ipv6 ? .loopbackV6 : .loopbackV4
        let (upstream, received) = try recordingUpstream(Endpoint(host, 0))
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(host: host, upstreams: [upstream.endpoint.description], ["--proxy-protocol", version.rawValue])
        defer { relay.stop() }

        let client = try TestSocket.connect(to: listen)
        defer { client.close() }
        let clientEndpoint = try #require(client.localEndpoint)
        let payload = pattern(count: 300_000, seed: 7)
        let (answer, end) = try exchange(client, payload)
        #expect(answer == Array("ok\n".utf8) && end == .eof)

        #expect(waitUntil(timeout: .seconds(10)) { received.withLock { $0.count } == 1 })
        let bytes = received.withLock { $0.first?.bytes } ?? []
        guard case .header(let parsed, let length) = ProxyHeaderParser.parse(bytes) else {
            Issue.record("no PROXY header at the start of \(bytes.prefix(64))")
            return
        }
        #expect(parsed == ProxyHeader(version: version, addresses: ProxyAddresses(source: clientEndpoint, destination: listen)))
        if version == .v1 {
            // The line itself, as the specification writes it.
            let family = ipv6 ? "TCP6" : "TCP4"
            #expect(String(decoding: bytes[0..<length], as: UTF8.self)
                == "PROXY \(family) \(host) \(host) \(clientEndpoint.port) \(listen.port)\r\n")
        } else {
            #expect(Array(bytes[0..<12]) == ProxyHeader.v2Signature && bytes[12] == 0x21 && bytes[13] == (ipv6 ? 0x21 : 0x11))
        }
        #expect(bytes.count - length == payload.count)
        #expect(checksum(bytes[length...]) == checksum(payload))
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("end", in: line) == "completed")
        // The log counts the client's bytes, not the header.
        #expect(field("bytes_to_upstream", in: line) == "\(payload.count)")
    }

    /*
       test sender 127.0.0.1 ──PROXY header "client 127.0.0.9" / "client 192.0.2.7" + bytes──► sameport ──PROXY v1 + bytes──► upstream
     */
    @Test("accept_proxy with egress = client: the upstream sees the announced client's own ip:port (IP_TRANSPARENT), and the bytes intact")
    func announcedClientIsTheEgress() throws {
        let (upstream, received) = try recordingUpstream()
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description], [
            "--accept-proxy", "--accept-proxy-from", "127.0.0.1", "--egress", "client"])
        defer { relay.stop() }
        let port = try freePort(IPAddress.loopbackV4)
        let client = try TestSocket.connect(to: listen)
        defer { client.close() }
        let payload = pattern(count: 100_000, seed: 11)
        let (answer, end) = try exchange(client, try header(.v1, "127.0.0.9:\(port)", "\(listen)") + payload)
        #expect(answer == Array("ok\n".utf8) && end == .eof)
        #expect(waitUntil(timeout: .seconds(10)) { received.withLock { $0.count } == 1 })
        let seen = received.withLock { $0.first }
        let announced = Endpoint(try #require(IPAddress("127.0.0.9")), port)
        #expect(seen?.peer == announced, "\(String(describing: seen?.peer))")
        #expect(seen.map { checksum($0.bytes) } == checksum(payload))
        let line = try relay.waitForLines(containing: "end=completed")[0]
        #expect(field("client", in: line) == "127.0.0.9:\(port)" && field("egress", in: line) == "127.0.0.9:\(port)", "\(line)")
    }

    @Test("accept_proxy: an announced 127.0.0.9 is denied; an announced 192.0.2.7 is served, logged and announced on, its bytes after the header intact; v2 LOCAL keeps the real client")
    func accept() throws {
        let (upstream, received) = try recordingUpstream()
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description], [
            "--accept-proxy", "--accept-proxy-from", "127.0.0.1", "--deny", "127.0.0.9", "--proxy-protocol", "v1"])
        defer { relay.stop() }

        // Denied: the sender is allowed to send headers, the client it announces is not served.
        let denied = try TestSocket.connect(to: listen)
        defer { denied.close() }
        try denied.sendAll(try header(.v1, "127.0.0.9:4444", "127.0.0.1:80") + Array("secret".utf8))
        #expect(try denied.waitForEnd(timeout: .seconds(10)) == .reset)
        let refused = try relay.waitForLines(containing: "end=refused")[0]
        #expect(field("client", in: refused) == "127.0.0.9:4444")
        #expect(refused.contains("cause=\"the client is in deny 127.0.0.9/32\""))

        // Served: the header and the client's first bytes in one write; the bytes arrive intact.
        let payload = pattern(count: 200_000, seed: 9)
        let served = try TestSocket.connect(to: listen)
        defer { served.close() }
        let (answer, end) = try exchange(served, try header(.v2, "192.0.2.7:5555", "198.51.100.1:443") + payload)
        #expect(answer == Array("ok\n".utf8) && end == .eof)
        #expect(waitUntil(timeout: .seconds(10)) { received.withLock { $0.count } == 1 })
        let bytes = received.withLock { $0.first?.bytes } ?? []
        let onward = Array("PROXY TCP4 192.0.2.7 198.51.100.1 5555 443\r\n".utf8)
        #expect(Array(bytes.prefix(onward.count)) == onward, "\(String(decoding: bytes.prefix(64), as: UTF8.self))")
        #expect(bytes.count == onward.count + payload.count)
        #expect(checksum(bytes.dropFirst(onward.count)) == checksum(payload))
        let line = try relay.waitForLines(containing: "end=completed")[0]
        #expect(field("client", in: line) == "192.0.2.7:5555")
        #expect(field("bytes_to_upstream", in: line) == "\(payload.count)")

        // v2 LOCAL (a health check): the connection's own addresses stand.
        let local = try TestSocket.connect(to: listen)
        defer { local.close() }
        let localEndpoint = try #require(local.localEndpoint)
        let (_, localEnd) = try exchange(local, ProxyHeader(version: .v2, addresses: nil, isLocal: true).encoded() + Array("hi".utf8))
        #expect(localEnd == .eof)
        #expect(waitUntil(timeout: .seconds(10)) { received.withLock { $0.count } == 2 })
        let localBytes = received.withLock { $0.last?.bytes } ?? []
        #expect(String(decoding: localBytes, as: UTF8.self) == "PROXY TCP4 127.0.0.1 \(listen.address) \(localEndpoint.port) \(listen.port)\r\nhi")
        // Nothing of the denied client reached the upstream.
        #expect(upstream.peers.count == 2)
    }

    @Test("accept_proxy: a sender outside accept_proxy_from is reset and logged, and reaches no upstream")
    func untrustedSender() throws {
        let (upstream, _) = try recordingUpstream()
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description], [
            "--accept-proxy", "--accept-proxy-from", "127.0.0.1"])
        defer { relay.stop() }
        // Refused on accept, before any byte is read: the reset may even beat connect's return.
        let end: TestSocket.End
        do {
            let client = try TestSocket.connect(to: listen, from: Endpoint(IPAddress("127.0.0.3") ?? .loopbackV4, 0))
            defer { client.close() }
            end = try client.waitForEnd(timeout: .seconds(10))
        } catch TestError.system(_, ECONNRESET) {
            end = .reset
        }
        #expect(end == .reset)
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("end", in: line) == "refused")
        #expect(field("client", in: line)?.hasPrefix("127.0.0.3:") == true)
        #expect(line.contains("cause=\"the sender is in no accept_proxy_from block (127.0.0.1/32): it may not announce a client\""))
        #expect(upstream.peers.isEmpty)
    }

    @Test("accept_proxy: garbage, malformed, truncated, oversized (v1 and v2) and late headers each close their client with one line naming the problem; the upstream sees nothing, no descriptor is left")
    func badHeaders() throws {
        let (upstream, _) = try recordingUpstream()
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description], [
            "--accept-proxy", "--accept-proxy-from", "127.0.0.1", "--proxy-timeout", "1s"])
        defer { relay.stop() }
        let descriptorsBefore = relay.openFileDescriptors(linkingTo: ["socket:"])
        let cases: [(name: String, bytes: [UInt8], halfClose: Bool, cause: String)] = [
            ("garbage", Array("GET / HTTP/1.1\r\nHost: example\r\n\r\n".utf8), false,
             "cause=\"not a PROXY protocol header: it begins with neither \\\"PROXY \\\" (v1) nor the v2 signature\""),
            ("malformed", Array("PROXY TCP4 192.0.2.7 127.0.0.1 70000 80\r\nhello".utf8), false,
             "cause=\"malformed PROXY v1 header: the source port '70000' is not a number from 0 to 65535\""),
            ("truncated", Array("PROXY TCP4 192.0.2.7".utf8), true,
             "cause=\"truncated PROXY header: the client closed after 20 bytes\""),
            ("oversized v1", Array(("PROXY UNKNOWN " + String(repeating: "x", count: 200)).utf8), false,
             "cause=\"oversized PROXY v1 header: no CRLF within 107 bytes\""),
            ("oversized v2", ProxyHeader.v2Signature + [0x21, 0x11, 0xFF, 0xFF] + [UInt8](repeating: 0, count: 64), false,
             "cause=\"oversized PROXY v2 header: it states 65535 bytes of addresses and TLVs, sameport takes at most 4096\""),
            ("late", Array("PROXY ".utf8), false,
             "cause=\"no complete PROXY header within 1s (6 bytes received)\""),
        ]
        for (index, item) in cases.enumerated() {
            let client = try TestSocket.connect(to: listen)
            defer { client.close() }
            try client.sendAll(item.bytes)
            if item.halfClose { client.shutdownWrite() }
            let started = ContinuousClock.now
            let end = try client.waitForEnd(timeout: .seconds(10))
            #expect(end == .eof || end == .reset, "\(item.name): \(end)")
            if item.name == "late" { #expect(ContinuousClock.now - started >= .milliseconds(800), "closed before the timeout") }
            let lines = try relay.waitForLines(containing: "connection ended", count: index + 1)
            let line = lines[index]
            #expect(field("end", in: line) == "bad-proxy-header", "\(item.name): \(line)")
            #expect(line.contains(item.cause), "\(item.name): \(line)")
            #expect(field("client", in: line)?.hasPrefix("127.0.0.1:") == true, "\(item.name): \(line)")
        }
        #expect(relay.lines(containing: "connection ended").count == cases.count, "one line per client")
        #expect(upstream.peers.isEmpty)
        #expect(waitUntil(timeout: .seconds(10)) { relay.openFileDescriptors(linkingTo: ["socket:"]) == descriptorsBefore })
    }

    @Test("A client reading its header counts towards max_connections: the next client is served only once the first one's header timed out")
    func readersCountTowardsTheLimit() throws {
        let (upstream, received) = try recordingUpstream()
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description], [
            "--accept-proxy", "--accept-proxy-from", "127.0.0.1", "--max-connections", "1", "--proxy-timeout", "2s"])
        defer { relay.stop() }
        let sockets = relay.openFileDescriptors(linkingTo: ["socket:"])
        let silent = try TestSocket.connect(to: listen)
        defer { silent.close() }
        try silent.sendAll(Array("PROXY ".utf8))
        #expect(waitUntil(timeout: .seconds(10)) { relay.openFileDescriptors(linkingTo: ["socket:"]) == sockets + 1 }, "the first client was not accepted")
        // The second waits in the kernel's backlog until the first one's header times out.
        let second = try TestSocket.connect(to: listen)
        defer { second.close() }
        let (answer, _) = try exchange(second, try header(.v1, "192.0.2.7:5555", "127.0.0.1:80") + Array("hello".utf8))
        #expect(answer == Array("ok\n".utf8))
        #expect(received.withLock { $0.map(\.bytes) } == [Array("hello".utf8)])
        let lines = try relay.waitForLines(containing: "connection ended", count: 2)
        #expect(lines.count == 2 && lines.first?.contains("no complete PROXY header within 2s") == true, "\(lines)")
        #expect(lines.last.flatMap { field("client", in: $0) } == "192.0.2.7:5555")
    }

    @Test("SIGTERM closes a client still sending its header at once (end=shutdown): the drain does not wait for it")
    func drainClosesReaders() throws {
        let (upstream, _) = try recordingUpstream()
        defer { upstream.stop() }
        let (relay, listen) = try startRelay(upstreams: [upstream.endpoint.description], [
            "--accept-proxy", "--accept-proxy-from", "127.0.0.1", "--proxy-timeout", "60s"])
        defer { relay.stop() }
        let sockets = relay.openFileDescriptors(linkingTo: ["socket:"])
        let client = try TestSocket.connect(to: listen)
        defer { client.close() }
        try client.sendAll(Array("PROXY TCP4".utf8))
        #expect(waitUntil(timeout: .seconds(10)) { relay.openFileDescriptors(linkingTo: ["socket:"]) == sockets + 1 }, "the client was not accepted")
        let started = ContinuousClock.now
        #expect(relay.stop(signal: SIGTERM, timeout: .seconds(20)) == 0)
        #expect(ContinuousClock.now - started < .seconds(15))
        let line = try #require(relay.lines(containing: "connection ended").first)
        #expect(field("end", in: line) == "shutdown")
        #expect(try client.waitForEnd(timeout: .seconds(5)) != .timeout)
        #expect(upstream.peers.isEmpty)
    }

    @Test("--accept-proxy without --accept-proxy-from is a usage error naming the fix; check shows the settings")
    func settings() throws {
        let usage = try RelayProcess(["--listen", "127.0.0.1:1", "--upstream", "127.0.0.1:2", "--accept-proxy"])
        #expect(usage.waitForExit(timeout: .seconds(10)) == 2)
        #expect(usage.output.contains("sameport: usage error: accept_proxy needs accept_proxy_from: list the proxies trusted to announce clients"))
        #expect(usage.output.contains("(--accept-proxy-from 127.0.0.1)"))

        let path = FileManager.default.temporaryDirectory.appendingPathComponent("sameport-proxy-\(getpid()).toml").path
        try """
            [[relay]]
            listen = "127.0.0.1:7600"
            upstream = "127.0.0.1:9600"
            proxy_protocol = "v2"
            accept_proxy = true
            accept_proxy_from = ["127.0.0.1", "10.0.0.0/8"]
            proxy_timeout = "2s"
            """.write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let check = try RelayProcess(["check", "--config", path])
        #expect(check.waitForExit(timeout: .seconds(10)) == 0)
        let lines = check.output.split(separator: "\n")
        #expect(lines.first?.hasSuffix("PROXY") == true, "\(check.output)")
        #expect(lines.dropFirst().first?.hasSuffix("send v2; accept from 127.0.0.1/32,10.0.0.0/8 within 2s") == true, "\(check.output)")
    }
}
