import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// A configuration file that any user may read, in a directory of its own; `write` replaces it
/// (as an operator's editor would) before a reload.
private final class SharedConfig: @unchecked Sendable {  // used by one test thread
    let path: String
    private let directory: String

    init(_ text: String) throws {
        var template = Array("/tmp/sameport-systemd-XXXXXX".utf8CString)
        guard let created = mkdtemp(&template) else { throw TestError.failed("mkdtemp: \(errno)") }
        directory = String(cString: created)
        chmod(directory, 0o755)
        path = directory + "/sameport.toml"
        try write(text)
    }

    func write(_ text: String) throws {
        try text.write(toFile: path + ".new", atomically: false, encoding: .utf8)
        chmod(path + ".new", 0o644)
        guard rename(path + ".new", path) == 0 else { throw TestError.system("rename", errno) }
    }

    deinit {
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// A DNS server that never answers, for a process started under `prefix`: a UDP socket bound to
/// port 53 of a loopback address, and a resolv.conf naming it that `prefix` mounts over
/// /etc/resolv.conf in a mount namespace of the process's own (unshare; root). A lookup of a name
/// that is not in /etc/hosts then blocks for `seconds`, as on a network that lost its resolver.
private final class StalledResolver: @unchecked Sendable {  // used by one test thread
    let prefix: [String]
    private let socket: Int32
    private let directory: String

    init(seconds: Int) throws {
        var template = Array("/tmp/sameport-resolver-XXXXXX".utf8CString)
        guard let created = mkdtemp(&template) else { throw TestError.failed("mkdtemp: \(errno)") }
        directory = String(cString: created)
        let address = "127.53.\(UInt8.random(in: 1...254)).\(UInt8.random(in: 1...254))"
        let fd = Glibc.socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_port = in_port_t(53).bigEndian
        inet_pton(AF_INET, address, &sin.sin_addr)
        let bound = withUnsafePointer(to: &sin) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard fd >= 0, bound == 0 else {
            let code = errno
            if fd >= 0 { close(fd) }
            try? FileManager.default.removeItem(atPath: directory)
            throw TestError.system("bind \(address):53", code)
        }
        socket = fd
        let resolvConf = directory + "/resolv.conf"
        try "nameserver \(address)\noptions timeout:\(seconds) attempts:1\n".write(toFile: resolvConf, atomically: false, encoding: .utf8)
        prefix = ["unshare", "--mount", "sh", "-c", "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"", resolvConf]
    }

    func remove() {
        close(socket)
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// A listening socket for systemd-socket-activate to create: its address and fd name.
private struct ActivationSocket {
    var listen: Endpoint
    var name: String?
}

/// Starts `sameport ARGUMENTS` under systemd-socket-activate, which creates the sockets (as
/// root, SO_REUSEPORT off), waits for a first client, then execs sameport with LISTEN_FDS,
/// LISTEN_FDNAMES and the given environment. The PID stays the same across the exec.
private func startActivated(
    _ sockets: [ActivationSocket], _ arguments: [String], notify: NotifyListener? = nil,
    environment: [String: String] = [:], prefix: [String] = [], binary: String = RelayProcess.binary,
    datagram: Bool = false
) throws -> RelayProcess {
    var command = sockets.flatMap { ["-l", $0.listen.description] }
    if datagram { command.append("--datagram") }
    let names = sockets.compactMap(\.name)
    if !names.isEmpty { command.append("--fdname=" + names.joined(separator: ":")) }
    var variables = environment
    if let notify { variables["NOTIFY_SOCKET"] = notify.path }
    for (key, value) in variables.sorted(by: { $0.key < $1.key }) { command += ["-E", "\(key)=\(value)"] }
    return try RelayProcess(command + prefix + [binary] + arguments, executable: "/usr/bin/systemd-socket-activate")
}

/// Connects once systemd-socket-activate listens (it binds after it starts): this first client
/// is what makes it start the service.
private func connectWhenListening(_ listen: Endpoint) throws -> TestSocket {
    let deadline = ContinuousClock.now + .seconds(10)
    while true {
        do {
            return try TestSocket.connect(to: listen)
        } catch TestError.system(_, let code) where code == ECONNREFUSED && ContinuousClock.now < deadline {
            usleep(20_000)
        }
    }
}

/// Connects a client and checks an echo through it.
private func connectAndEcho(_ listen: Endpoint, _ text: String) throws -> TestSocket {
    let client = try connectWhenListening(listen)
    try client.sendAll(Array(text.utf8))
    let (bytes, _) = try client.receive(exactly: text.utf8.count, timeout: .seconds(10))
    #expect(String(decoding: bytes, as: UTF8.self) == text)
    return client
}

/// The position just past the `number`th RELOADING=1 (from 1) once it has come: what a reload
/// sends after it is about that reload, whatever came late from the one before.
private func afterReloading(_ notify: NotifyListener, number: Int) throws -> Int {
    var position: Int?
    _ = waitUntil(timeout: .seconds(10)) {
        let messages = notify.messages
        position = messages.indices.filter { messages[$0]["RELOADING"] == "1" }.dropFirst(number - 1).first.map { $0 + 1 }
        return position != nil
    }
    guard let position else { throw TestError.timeout("RELOADING=1 number \(number); got: \(notify.messages.map(\.description))") }
    return position
}

/// READY, RELOADING and STOPPING in the order they came.
private func lifecycle(_ notify: NotifyListener) -> [String] {
    notify.messages.compactMap { message in
        ["READY", "RELOADING", "STOPPING"].first { message[$0] == "1" }
    }
}

/// Two free loopback ports.
private func freePorts(_ count: Int) throws -> [UInt16] {
    var ports: [UInt16] = []
    while ports.count < count {
        let port = try freePort()
        if !ports.contains(port) { ports.append(port) }
    }
    return ports
}

/// The capability sets of every thread of `pid`: `CapEff` etc. as bit masks, one entry per thread.
private func capabilitySets(_ pid: Int32) -> [[String: UInt64]] {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
    return tasks.compactMap { task in
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/status", encoding: .utf8) else { return nil }
        var sets: [String: UInt64] = [:]
        for line in status.split(separator: "\n") where line.hasPrefix("Cap") {
            let parts = line.split(separator: ":", maxSplits: 1)
            if parts.count == 2 { sets[String(parts[0])] = UInt64(parts[1].trimmingCharacters(in: .whitespaces), radix: 16) }
        }
        return sets
    }
}

private func relayConfig(name: String = "proxy", listen: Endpoint, upstream: Endpoint, extra: String = "") -> String {
    """
    [[relay]]
    name = "\(name)"
    listen = "\(listen)"
    upstream = "\(upstream)"
    \(extra)

    """
}

@Suite("systemd integration (systemd-socket-activate, NOTIFY_SOCKET)", .serialized)
struct SystemdTests {
    init() {
        _ = ignoreSIGPIPE
    }

    @Test("Socket activation: the named socket is used with SO_REUSEPORT fixed up; READY, STATUS, WATCHDOG, RELOADING, STOPPING arrive in order")
    func activationAndNotifications() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let notify = try NotifyListener()
        defer { notify.close() }
        let port = try freePort()
        let listen = Endpoint(.loopbackV4, port)
        let config = try SharedConfig(relayConfig(listen: listen, upstream: upstream.endpoint))
        let relay = try startActivated(
            [ActivationSocket(listen: listen, name: "proxy")], ["run", "--config", config.path],
            notify: notify, environment: ["WATCHDOG_USEC": "400000"])
        defer { relay.stop() }

        let client = try connectAndEcho(listen, "first client\n")
        try relay.waitUntilListening()
        #expect(relay.lines(containing: "socket 3 \"proxy\" from systemd had SO_REUSEPORT off, which the egress needs to bind \(listen): switched it on; set ReusePort=yes in the .socket unit").count == 1)
        #expect(relay.lines(containing: "relay proxy listening on \(listen) -> \(upstream.endpoint)").first?.contains("socket=systemd") == true)
        // The upstream sees the fixed source port, through the inherited socket.
        #expect(upstream.peers == [listen])
        client.close()
        let ready = try notify.waitFor("READY=1") { $0["READY"] == "1" }
        #expect(ready["STATUS"]?.hasPrefix("1 relay, ") == true, "\(ready)")
        try notify.waitFor("STATUS with 1 served") { $0["STATUS"] == "1 relay, 0 open connections, 0 queued, 1 served" }
        // WATCHDOG_USEC=400ms: a ping every 200 ms.
        #expect(waitUntil(timeout: .seconds(5)) { notify.messages.filter { $0["WATCHDOG"] == "1" }.count >= 4 })

        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reloaded \(config.path): 1 relay; added: none; removed: none; changed: none; unchanged: 1")
        let sentAt = NotifyListener.monotonicMicroseconds()
        let reloading = try notify.waitFor("RELOADING=1") { $0["RELOADING"] == "1" }
        let stamp = UInt64(reloading["MONOTONIC_USEC"] ?? "") ?? 0
        #expect(stamp > 0 && stamp <= reloading.monotonicMicroseconds && sentAt - min(sentAt, stamp) < 5_000_000, "MONOTONIC_USEC=\(stamp)")
        let pingsBefore = notify.messages.filter { $0["WATCHDOG"] == "1" }.count
        #expect(waitUntil(timeout: .seconds(5)) { notify.messages.filter { $0["WATCHDOG"] == "1" }.count >= pingsBefore + 2 })
        #expect(relay.stop(signal: SIGTERM) == 0)
        try notify.waitFor("STOPPING=1") { $0["STOPPING"] == "1" }

        let messages = notify.messages
        #expect(lifecycle(notify) == ["READY", "RELOADING", "READY", "STOPPING"], "\(messages)")
        // WATCHDOG=1 pings both before and after the reload; nothing after STOPPING but pings.
        let reloadIndex = messages.firstIndex { $0["RELOADING"] == "1" } ?? 0
        #expect(messages[..<reloadIndex].contains { $0["WATCHDOG"] == "1" })
        #expect(messages[reloadIndex...].contains { $0["WATCHDOG"] == "1" })
        // STATUS= goes out at most once a second, alone or with READY/RELOADING/STOPPING.
        let statusTimes = messages.filter { $0["STATUS"] != nil }.map(\.monotonicMicroseconds)
        for (earlier, later) in zip(statusTimes, statusTimes.dropFirst()) {
            #expect(later - earlier >= 900_000, "STATUS updates \(later - earlier) us apart")
        }
    }

    @Test("SIGHUP with a changed file keeps open connections, applies the change to the next ones, adds and removes relays; a bad file keeps the old configuration")
    func reload() throws {
        let first = try TestServer(handler: TestServer.echo)
        let second = try TestServer(handler: TestServer.echo)
        defer { first.stop(); second.stop() }
        let notify = try NotifyListener()
        defer { notify.close() }
        let ports = try freePorts(2)
        let listen = Endpoint(.loopbackV4, ports[0])
        let extraListen = Endpoint(.loopbackV4, ports[1])
        let config = try SharedConfig(relayConfig(listen: listen, upstream: first.endpoint))
        let relay = try startActivated(
            [ActivationSocket(listen: listen, name: "proxy")], ["run", "--config", config.path], notify: notify)
        defer { relay.stop() }
        let kept = try connectAndEcho(listen, "before the reload\n")
        try relay.waitUntilListening()
        #expect(first.peers == [listen])

        // Change the upstream and add a relay.
        try config.write(relayConfig(listen: listen, upstream: second.endpoint)
            + relayConfig(name: "extra", listen: extraListen, upstream: second.endpoint))
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reloaded \(config.path): 2 relays; added: extra; removed: none; changed: proxy; unchanged: 0")
        // The open connection goes on, to the upstream it started with.
        try kept.sendAll(Array("after the reload\n".utf8))
        #expect(String(decoding: try kept.receive(exactly: 17, timeout: .seconds(5)).bytes, as: UTF8.self) == "after the reload\n")
        // The next connection takes the new upstream; the added relay serves, from its own port.
        let next = try connectAndEcho(listen, "next\n")
        let added = try connectAndEcho(extraListen, "added\n")
        #expect(first.peers == [listen])
        #expect(Set(second.peers) == [listen, extraListen])
        #expect(relay.lines(containing: "connection ended").isEmpty, "no connection ended: \(relay.lines(containing: "connection ended"))")
        // Frees proxy's 4-tuple to the second upstream (one connection per pair).
        next.close()
        try relay.waitForLines(containing: "connection ended relay=proxy")

        // A bad file: logged, said in STATUS, and the running configuration stays.
        try config.write("[[relay]\nname = \"proxy\"\n")
        kill(relay.pid, SIGHUP)
        let failure = try relay.waitForLines(containing: "reload failed, still running the previous configuration: \(config.path):1:")
        #expect(failure.first?.contains(" error ") == true, "\(failure)")
        try notify.waitFor("STATUS with the reload failure") {
            ($0["STATUS"] ?? "").hasPrefix("reload failed (\(config.path):1:") && ($0["STATUS"] ?? "").contains("running the previous configuration; 2 relays, ")
        }
        _ = try connectAndEcho(listen, "still here\n").close()

        // The relay with systemd's socket cannot be renamed away by a reload.
        try config.write(relayConfig(name: "renamed", listen: listen, upstream: second.endpoint)
            + relayConfig(name: "extra", listen: extraListen, upstream: second.endpoint))
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reload failed, still running the previous configuration: relay proxy takes its socket from systemd, so a reload cannot remove or rename it: keep the relay, or change the .socket unit and restart the service")
        #expect(relay.lines(containing: "relay renamed listening").isEmpty)

        // Remove the added relay while a client of it is connected: it stops accepting, and its
        // connection finishes.
        let reloadsBefore = lifecycle(notify).filter { $0 == "RELOADING" }.count
        try config.write(relayConfig(listen: listen, upstream: second.endpoint))
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reloaded \(config.path): 1 relay; added: none; removed: extra; changed: none; unchanged: 1")
        try added.sendAll(Array("draining\n".utf8))
        #expect(String(decoding: try added.receive(exactly: 9, timeout: .seconds(5)).bytes, as: UTF8.self) == "draining\n")
        #expect(throws: (any Error).self) { try TestSocket.connect(to: extraListen, timeout: .seconds(2)) }
        added.close()
        try relay.waitForLines(containing: "relay extra retired: it has no connection left")
        // The status no longer names the failure once a reload succeeded.
        let goodReload = try afterReloading(notify, number: reloadsBefore + 1)
        try notify.waitFor(after: goodReload, "READY after the good reload") { $0["READY"] == "1" }
        try notify.waitFor(after: goodReload, "a status without the failure") { ($0["STATUS"] ?? "").hasPrefix("1 relay, ") }
        kept.close()
        #expect(relay.stop() == 0)
    }

    @Test("A reload is refused, changing nothing, when a kept relay's new egress cannot bind, or when a new relay's address is another process's (even another sameport's, with SO_REUSEPORT)")
    func reloadRefusals() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        let blocker = try TestServer(handler: TestServer.hold)  // a listener without SO_REUSEPORT
        defer { upstream.stop(); blocker.stop() }
        let port = try freePort()
        let listen = Endpoint(.loopbackV4, port)
        let config = try SharedConfig(relayConfig(listen: listen, upstream: upstream.endpoint))
        let relay = try RelayProcess(["run", "--config", config.path])
        defer { relay.stop() }
        try relay.waitUntilListening()
        // Another sameport on 127.0.0.2 and the same port.
        let other = Endpoint(IPAddress("127.0.0.2") ?? .loopbackV4, port)
        let neighbour = try RelayProcess(["--listen", other.description, "--upstream", upstream.endpoint.description])
        defer { neighbour.stop() }
        try neighbour.waitUntilListening()

        try config.write(relayConfig(listen: listen, upstream: upstream.endpoint, extra: "egress = \"\(blocker.endpoint)\""))
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reload failed, still running the previous configuration: relay proxy: the egress cannot bind \(blocker.endpoint): Address already in use")

        try config.write(relayConfig(listen: listen, upstream: upstream.endpoint) + relayConfig(name: "second", listen: other, upstream: upstream.endpoint))
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reload failed, still running the previous configuration: relay second: cannot start: cannot listen on \(other): Address already in use")
        #expect(relay.lines(containing: "reloaded").isEmpty)
        // Still the old settings: dialled from the listening port.
        _ = try connectAndEcho(listen, "unchanged\n").close()
        #expect(upstream.peers.last == listen)

        // A relay removed while a client holds a connection through it, whose port another
        // process then takes: added back, it is refused, not bound beside that process.
        let xListen = Endpoint(.loopbackV4, try freePort())
        let withX = relayConfig(listen: listen, upstream: upstream.endpoint) + relayConfig(name: "x", listen: xListen, upstream: upstream.endpoint)
        try config.write(withX)
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reloaded \(config.path): 2 relays; added: x; removed: none")
        let held = try connectAndEcho(xListen, "held\n")
        defer { held.close() }
        try config.write(relayConfig(listen: listen, upstream: upstream.endpoint))
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reloaded \(config.path): 1 relay; added: none; removed: x")
        let taker = try RelayProcess(["--listen", xListen.description, "--upstream", upstream.endpoint.description])
        defer { taker.stop() }
        try taker.waitUntilListening()
        try config.write(withX)
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reload failed, still running the previous configuration: relay x: cannot start: cannot listen on \(xListen): Address already in use")
        #expect(relay.lines(containing: "reloaded").count == 2, "\(relay.output)")
        #expect(relay.lines(containing: "relay x listening").count == 1)
    }

    @Test("A reload stuck on its host names (a resolver that never answers) fails after --reload-timeout with READY=1; the next reload works while it is still stuck, and its late result is dropped")
    func reloadTimeout() throws {
        // Two upstreams: one connection stays open through the reload, and each pair takes one.
        let upstream = try TestServer(handler: TestServer.echo)
        let other = try TestServer(handler: TestServer.echo)
        defer { upstream.stop(); other.stop() }
        let notify = try NotifyListener()
        defer { notify.close() }
        let resolver = try StalledResolver(seconds: 10)
        defer { resolver.remove() }
        let ports = try freePorts(2)
        let listen = Endpoint(.loopbackV4, ports[0]), extra = Endpoint(.loopbackV4, ports[1])
        let main = relayConfig(listen: listen, upstream: upstream.endpoint).replacingOccurrences(
            of: "upstream = \"\(upstream.endpoint)\"", with: "upstream = [\"\(upstream.endpoint)\", \"\(other.endpoint)\"]")
        let config = try SharedConfig(main)
        let relay = try RelayProcess(
            ["run", "--config", config.path, "--reload-timeout", "2s"], prefix: resolver.prefix,
            environment: ProcessInfo.processInfo.environment.merging(["NOTIFY_SOCKET": notify.path]) { $1 })
        defer { relay.stop() }
        try relay.waitUntilListening()
        let kept = try connectAndEcho(listen, "before\n")
        defer { kept.close() }

        // A host name that the resolver takes 10 s to give up on (a hung file system blocks the
        // same way; a FIFO no longer does: it is refused at once).
        try config.write(main + relayConfig(name: "stalled", listen: extra, upstream: upstream.endpoint)
            .replacingOccurrences(of: "upstream = \"\(upstream.endpoint)\"", with: "upstream = \"stalled.test:9\""))
        kill(relay.pid, SIGHUP)
        let hung = try afterReloading(notify, number: 1)
        // While it waits, the status says so (the timer sends it within a second or so).
        try notify.waitFor(after: hung, "a reloading status") { ($0["STATUS"] ?? "").hasPrefix("reloading: 1 relay, 1 open connection, ") }
        try relay.waitForLines(containing: "reload failed, still running the previous configuration: reading \(config.path) and resolving its host names took longer than 2s: check the file's file system and the resolver, or raise --reload-timeout")
        try notify.waitFor(after: hung, "READY=1 after the timed-out reload") { $0["READY"] == "1" }
        try notify.waitFor(after: hung, "the failure in STATUS=") { ($0["STATUS"] ?? "").hasPrefix("reload failed (reading \(config.path) ") }
        _ = try connectAndEcho(listen, "still served\n").close()

        // The read is still stuck: the next reload reads on another thread and applies its file
        // (it failed at once with "an earlier reload is still reading", until a restart).
        let late = main + relayConfig(name: "extra", listen: extra, upstream: upstream.endpoint)
        try config.write(late)
        kill(relay.pid, SIGHUP)
        try relay.waitForLines(containing: "reloaded \(config.path): 2 relays; added: extra")
        try notify.waitFor(after: try afterReloading(notify, number: 2), "READY=1 after the good reload") { $0["READY"] == "1" }
        #expect(relay.lines(containing: "the reload that timed out").isEmpty, "the stuck read ended too early to test anything: \(relay.output)")

        // The stuck read ends at last: its result (relay "stalled", unresolved) is dropped.
        try relay.waitForLines(containing: "the reload that timed out has read \(config.path) at last; its result is dropped (a later reload has read the file since)", timeout: .seconds(30))
        #expect(relay.lines(containing: "relay stalled").isEmpty)
        // Every reload ended with one READY=1; the dropped late result sent none.
        #expect(lifecycle(notify) == ["READY", "RELOADING", "READY", "RELOADING", "READY"], "\(notify.messages)")
        _ = try connectAndEcho(extra, "added\n").close()
        try kept.sendAll(Array("after\n".utf8))
        #expect(String(decoding: try kept.receive(exactly: 6, timeout: .seconds(5)).bytes, as: UTF8.self) == "after\n")
        #expect(relay.stop() == 0)
    }

    @Test("SIGTERM: STOPPING=1, no new clients, an open transfer drains to completion, exit 0")
    func drainOnSIGTERM() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let notify = try NotifyListener()
        defer { notify.close() }
        let listen = Endpoint(.loopbackV4, try freePort())
        let config = try SharedConfig(relayConfig(listen: listen, upstream: upstream.endpoint, extra: "drain_timeout = \"20s\""))
        let relay = try startActivated(
            [ActivationSocket(listen: listen, name: "proxy")], ["run", "--config", config.path], notify: notify)
        defer { relay.stop() }
        let client = try connectAndEcho(listen, "hello\n")
        try relay.waitUntilListening()

        kill(relay.pid, SIGTERM)
        try relay.waitForLines(containing: "stopping on SIGTERM: draining 1 open connection for up to 20s")
        try notify.waitFor("STOPPING=1") { $0["STOPPING"] == "1" }
        #expect(throws: (any Error).self) { try TestSocket.connect(to: listen, timeout: .seconds(2)) }
        // The transfer goes on after the signal: 8 MiB each way, checked.
        let payload = pattern(count: 8 << 20, seed: 41)
        let sender = Background { try? client.sendAll(payload, timeout: .seconds(60)); client.shutdownWrite() }
        let (bytes, end) = try client.receiveToEnd(timeout: .seconds(60))
        #expect(sender.join(timeout: .seconds(10)))
        #expect(end == .eof)
        #expect(bytes.count == payload.count)
        #expect(bytes == payload)
        #expect(relay.waitForExit(timeout: .seconds(10)) == 0)
        let ended = relay.lines(containing: "connection ended")
        #expect(ended.count == 1)
        #expect(field("end", in: ended.first ?? "") == "completed")
        #expect(field("bytes_to_client", in: ended.first ?? "") == "\(payload.count + 6)")
        #expect(relay.lines(containing: "stopped").count == 1)
    }

    @Test("SIGTERM: a connection still open at the drain timeout is cut (end=shutdown), exit 0")
    func drainTimeout() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let listen = Endpoint(.loopbackV4, try freePort())
        let config = try SharedConfig(relayConfig(listen: listen, upstream: upstream.endpoint, extra: "drain_timeout = \"1s\""))
        let relay = try startActivated([ActivationSocket(listen: listen, name: "proxy")], ["run", "--config", config.path])
        defer { relay.stop() }
        let client = try connectAndEcho(listen, "idle\n")
        try relay.waitUntilListening()
        let start = ContinuousClock.now
        kill(relay.pid, SIGTERM)
        #expect(try client.waitForEnd(timeout: .seconds(10)) == .reset)
        let elapsed = ContinuousClock.now - start
        #expect(elapsed >= .milliseconds(900) && elapsed < .seconds(5), "cut after \(elapsed)")
        #expect(relay.waitForExit(timeout: .seconds(10)) == 0)
        #expect(field("end", in: relay.lines(containing: "connection ended").first ?? "") == "shutdown")
    }

    @Test("A socket root created, passed to sameport running as nobody: without CAP_CHOWN a clear refusal with ERRNO=; with it the socket is taken over and CAP_CHOWN dropped from every thread")
    func wrongOwner() throws {
        guard geteuid() == 0 else { return }  // needs root to create the socket and to become nobody
        let nobody = try NobodyBinary()
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }

        // Without CAP_CHOWN.
        do {
            let notify = try NotifyListener()
            defer { notify.close() }
            let listen = Endpoint(.loopbackV4, try freePort())
            let config = try SharedConfig(relayConfig(listen: listen, upstream: upstream.endpoint))
            let relay = try startActivated(
                [ActivationSocket(listen: listen, name: "proxy")], ["run", "--config", config.path],
                notify: notify, prefix: NobodyBinary.prefix, binary: nobody.path)
            defer { relay.stop() }
            let client = try connectWhenListening(listen)
            defer { client.close() }
            #expect(relay.waitForExit(timeout: .seconds(10)) == 2)
            let message = "sameport: cannot start: relay proxy: the egress cannot bind \(listen): socket 3 \"proxy\" from systemd belongs to uid 0, sameport runs as uid 65534, and the kernel shares a port (SO_REUSEPORT) only between sockets of one owner: run sameport as uid 0, or grant it CAP_CHOWN (AmbientCapabilities=CAP_CHOWN) to take the socket over"
            #expect(relay.lines(containing: "sameport: ") == [message], "\(relay.output)")
            let failure = try notify.waitFor("ERRNO=") { $0["ERRNO"] != nil }
            #expect(failure["ERRNO"] == "\(EADDRINUSE)")
            #expect(failure["STATUS"] == String(message.dropFirst("sameport: ".count)))
            #expect(upstream.peers.isEmpty)
        }

        // With CAP_CHOWN (ambient, as AmbientCapabilities= gives it), and with CAP_SETPCAP too,
        // which lets it go from the bounding set as well.
        for (caps, boundingKeeps) in [("+chown", true), ("+chown,+setpcap", false)] {
            let listen = Endpoint(.loopbackV4, try freePort())
            let config = try SharedConfig(relayConfig(listen: listen, upstream: upstream.endpoint))
            let prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all,\(caps)", "--ambient-caps=-all,\(caps)"]
            let relay = try startActivated(
                [ActivationSocket(listen: listen, name: "proxy")], ["run", "--config", config.path],
                prefix: prefix, binary: nobody.path)
            defer { relay.stop() }
            let client = try connectAndEcho(listen, "as nobody\n")
            client.close()
            try relay.waitUntilListening()
            #expect(relay.lines(containing: "took over socket 3 \"proxy\" from uid 0 (CAP_CHOWN), so that the egress can bind \(listen)").count == 1, "\(relay.output)")
            #expect(upstream.peers.last == listen)
            let threads = capabilitySets(relay.pid)
            #expect(!threads.isEmpty)
            for sets in threads {
                for name in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
                    #expect((sets[name] ?? 1) & 1 == 0, "\(name) still has CAP_CHOWN: \(sets)")
                }
                #expect(((sets["CapBnd"] ?? 0) & 1 != 0) == boundingKeeps, "CapBnd \(sets)")
            }
            #expect(relay.stop() == 0)
        }

        // An egress that needs no take-over (ephemeral): the socket is taken over all the same, so
        // that a reload can switch the egress to the same port.
        do {
            let listen = Endpoint(.loopbackV4, try freePort())
            let config = try SharedConfig(relayConfig(listen: listen, upstream: upstream.endpoint, extra: "egress = \"ephemeral\""))
            let prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all,+chown", "--ambient-caps=-all,+chown"]
            let relay = try startActivated(
                [ActivationSocket(listen: listen, name: "proxy")], ["run", "--config", config.path],
                prefix: prefix, binary: nobody.path)
            defer { relay.stop() }
            _ = try connectAndEcho(listen, "ephemeral\n").close()
            try relay.waitUntilListening()
            #expect(relay.lines(containing: "took over socket 3 \"proxy\" from uid 0 (CAP_CHOWN)").count == 1, "\(relay.output)")
            #expect(upstream.peers.last?.port != listen.port)
            try config.write(relayConfig(listen: listen, upstream: upstream.endpoint))
            kill(relay.pid, SIGHUP)
            try relay.waitForLines(containing: "reloaded \(config.path): 1 relay; added: none; removed: none; changed: proxy; unchanged: 0")
            _ = try connectAndEcho(listen, "same port\n").close()
            #expect(upstream.peers.last == listen)
            #expect(relay.stop() == 0)
        }
    }

    @Test("Activation mistakes are named with their cure: a wrapper that forks (LISTEN_PID of another process), LISTEN_FDNAMES or LISTEN_FDS that do not fit the sockets, a socket on another relay's address, a missing file (ERRNO=ENOENT); a socket of another name still goes to the one relay")
    func activationMistakes() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let ports = try freePorts(3)
        let a = Endpoint(.loopbackV4, ports[0]), b = Endpoint(.loopbackV4, ports[1]), c = Endpoint(.loopbackV4, ports[2])
        let cure = "start sameport from a .socket unit, or unset LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID"

        /// Starts sameport activated with one socket, connects (which starts it), expects exit 2.
        func refused(_ socket: ActivationSocket, _ arguments: [String], environment: [String: String] = [:], prefix: [String] = []) throws -> RelayProcess {
            let relay = try startActivated([socket], arguments, environment: environment, prefix: prefix)
            let client = try connectWhenListening(socket.listen)
            defer { client.close() }
            #expect(relay.waitForExit(timeout: .seconds(10)) == 2, "\(relay.output)")
            return relay
        }

        let config = try SharedConfig(relayConfig(listen: a, upstream: upstream.endpoint))
        // A shell that runs sameport as its child: LISTEN_PID is the shell's, so the socket is
        // not sameport's to take, and it says so before the bind fails on that very socket.
        do {
            let relay = try refused(ActivationSocket(listen: a, name: "proxy"), ["run", "--config", config.path], prefix: ["/bin/sh", "-c", "\"$0\" \"$@\"; exit $?"])
            defer { relay.stop() }
            let warning = relay.lines(containing: "(LISTEN_PID), not this one")
            #expect(warning.count == 1, "\(relay.output)")
            #expect(warning.first?.contains(" warning LISTEN_FDS=1 is for process \(relay.pid) (LISTEN_PID), not this one (") == true, "\(warning)")
            #expect(warning.first?.hasSuffix("): the sockets are ignored; make sameport the service's main process (ExecStart=sameport ..., or exec it from a wrapper script) so that systemd passes them to it") == true, "\(warning)")
        }
        // Two names for one socket; a LISTEN_PID that is no process ID.
        for (variable, value, problem) in [
            ("LISTEN_FDNAMES", "proxy:extra", "LISTEN_FDNAMES=proxy:extra names 2 sockets, but LISTEN_FDS=1 passes 1: give every socket one name (FileDescriptorName=), or \(cure)"),
            ("LISTEN_PID", "abc", "LISTEN_PID=abc is not a process ID: \(cure)"),
        ] {
            let relay = try refused(ActivationSocket(listen: a, name: "proxy"), ["run", "--config", config.path], environment: [variable: value])
            defer { relay.stop() }
            #expect(relay.lines(containing: "sameport: ") == ["sameport: cannot start: cannot take the sockets passed by systemd: \(problem)"], "\(relay.output)")
        }
        // More sockets announced than passed.
        do {
            let relay = try refused(ActivationSocket(listen: a, name: "proxy"), ["run", "--config", config.path], environment: ["LISTEN_FDS": "40"])
            defer { relay.stop() }
            let lines = relay.lines(containing: "sameport: ")
            #expect(lines.count == 1 && lines[0].hasPrefix("sameport: cannot start: cannot take the sockets passed by systemd: LISTEN_FDS=40 passes descriptors 3 to 42, but ") && lines[0].hasSuffix(" is not open (closed before sameport started?): \(cure)"), "\(relay.output)")
        }
        // Relay a's socket is bound to relay b's address.
        do {
            let two = try SharedConfig(relayConfig(name: "a", listen: a, upstream: upstream.endpoint) + relayConfig(name: "b", listen: b, upstream: upstream.endpoint))
            let relay = try refused(ActivationSocket(listen: b, name: "a"), ["run", "--config", two.path])
            defer { relay.stop() }
            #expect(relay.lines(containing: "sameport: ") == [
                "sameport: cannot start: relay b: cannot listen on \(b): socket 3 \"a\" from systemd, which relay a serves, is bound there: make each relay's listen the ListenStream= of its own socket",
            ], "\(relay.output)")
        }
        // One socket of another name and one relay: matched, and said.
        do {
            let relay = try startActivated([ActivationSocket(listen: c, name: "other")], ["--listen", c.description, "--upstream", upstream.endpoint.description])
            defer { relay.stop() }
            _ = try connectAndEcho(c, "other\n").close()
            try relay.waitUntilListening()
            #expect(relay.lines(containing: "socket 3 \"other\" from systemd goes to the only relay, main, whatever its name").count == 1, "\(relay.output)")
            #expect(upstream.peers.last == c)
        }
        // A missing file: ERRNO= says which errno.
        do {
            let notify = try NotifyListener()
            defer { notify.close() }
            let relay = try RelayProcess(
                ["run", "--config", "/nonexistent/sameport.toml"],
                environment: ProcessInfo.processInfo.environment.merging(["NOTIFY_SOCKET": notify.path]) { $1 })
            defer { relay.stop() }
            #expect(relay.waitForExit(timeout: .seconds(10)) == 2)
            #expect(try notify.waitFor("ERRNO=") { $0["ERRNO"] != nil }["ERRNO"] == "\(ENOENT)")
        }
    }

    /// A launcher that keeps its own copy of the socket it passes (as PID 1 does), and shuts it
    /// down once sameport has served a client: every holder's accept then fails with EINVAL.
    private static let shutdownLauncher = """
        import os, socket, sys, time
        port, argv = int(sys.argv[1]), sys.argv[2:]
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(16)
        child = os.fork()
        if child == 0:
            os.dup2(listener.fileno(), 3)
            os.set_inheritable(3, True)
            os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="proxy", LISTEN_PID=str(os.getpid()))
            os.execv(argv[0], argv)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as client:
                    client.sendall(b"x")
                    if client.recv(1) == b"x":
                        break
            except OSError:
                time.sleep(0.05)
        listener.shutdown(socket.SHUT_RD)
        sys.exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
        """

    @Test("A passed socket shut down by another holder: exit 1 with one line naming the cure, and STATUS=/ERRNO= for systemd")
    func listenerShutDownByAnotherHolder() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let notify = try NotifyListener()
        defer { notify.close() }
        let listen = Endpoint(.loopbackV4, try freePort())
        let config = try SharedConfig(relayConfig(listen: listen, upstream: upstream.endpoint))
        let relay = try RelayProcess(
            ["-c", Self.shutdownLauncher, "\(listen.port)", RelayProcess.binary, "run", "--config", config.path],
            executable: "/usr/bin/python3",
            environment: ProcessInfo.processInfo.environment.merging(["NOTIFY_SOCKET": notify.path]) { $1 })
        defer { relay.stop() }
        #expect(relay.waitForExit(timeout: .seconds(20)) == 1, "\(relay.output)")
        let message = "relay proxy: accept on \(listen) failed: accept4: Invalid argument (errno 22): the socket no longer listens (did a process sharing it shut it down?); restart sameport"
        #expect(relay.lines(containing: "accept on").count == 1 && relay.lines(containing: " critical \(message)").count == 1, "\(relay.output)")
        let failure = try notify.waitFor("ERRNO=") { $0["ERRNO"] != nil }
        #expect(failure["ERRNO"] == "\(EINVAL)")
        #expect(failure["STATUS"] == message)
    }

    @Test("A watchdog interval of 1 us (WATCHDOG_USEC=1) pings every 10 ms, not in a busy loop")
    func watchdogFloor() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let notify = try NotifyListener()
        defer { notify.close() }
        let relay = try RelayProcess(
            ["--listen", "127.0.0.1:\(try freePort())", "--upstream", upstream.endpoint.description],
            environment: ProcessInfo.processInfo.environment.merging(["NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1"]) { $1 })
        defer { relay.stop() }
        try relay.waitForLines(containing: "watchdog: pinging systemd every 10ms")
        let start = notify.messages.count
        usleep(1_000_000)  // counting pings over one second, not waiting for an event
        let pings = notify.messages.dropFirst(start).filter { $0["WATCHDOG"] == "1" }.count
        #expect(pings >= 20 && pings <= 150, "\(pings) pings in a second")
        #expect(relay.stop() == 0)
    }

    @Test("Sockets and relays that do not match are refused at start-up, each named; one unnamed socket goes to the one relay")
    func matching() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let ports = try freePorts(3)
        let a = Endpoint(.loopbackV4, ports[0]), b = Endpoint(.loopbackV4, ports[1]), own = Endpoint(.loopbackV4, ports[2])

        // A socket named for no relay.
        do {
            let config = try SharedConfig(relayConfig(name: "a", listen: a, upstream: upstream.endpoint) + relayConfig(name: "b", listen: own, upstream: upstream.endpoint))
            let relay = try startActivated(
                [ActivationSocket(listen: a, name: "a"), ActivationSocket(listen: b, name: "web")], ["run", "--config", config.path])
            defer { relay.stop() }
            let client = try connectWhenListening(a)
            defer { client.close() }
            #expect(relay.waitForExit(timeout: .seconds(10)) == 2)
            #expect(relay.lines(containing: "sameport: ") == [
                "sameport: cannot start: socket 4 \"web\" from systemd has no relay named \"web\" (relays: a, b): name a relay \"web\", or set FileDescriptorName= to a relay's name",
            ], "\(relay.output)")
        }
        // A datagram socket.
        do {
            let config = try SharedConfig(relayConfig(listen: a, upstream: upstream.endpoint))
            let relay = try startActivated([ActivationSocket(listen: a, name: "proxy")], ["run", "--config", config.path], datagram: true)
            defer { relay.stop() }
            // A datagram to the socket starts the service; sent until it does (the socket is
            // bound a moment after the start).
            let probe = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
            defer { Glibc.close(probe) }
            var address = sockaddr_in(sin_family: sa_family_t(AF_INET), sin_port: a.port.bigEndian, sin_addr: in_addr(s_addr: UInt32(0x7f00_0001).bigEndian), sin_zero: (0, 0, 0, 0, 0, 0, 0, 0))
            let status = (0..<100).lazy.compactMap { _ -> Int32? in
                _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(probe, "x", 1, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
                return relay.waitForExit(timeout: .milliseconds(100))
            }.first
            #expect(status == 2)
            #expect(relay.lines(containing: "sameport: ") == [
                "sameport: cannot start: socket 3 \"proxy\" from systemd is not a listening TCP socket: give its .socket unit ListenStream=IP:PORT (not a path, ListenDatagram= or Accept=yes)",
            ], "\(relay.output)")
        }
        // One relay with a socket, one that binds its own address.
        do {
            let config = try SharedConfig(relayConfig(name: "a", listen: a, upstream: upstream.endpoint) + relayConfig(name: "b", listen: own, upstream: upstream.endpoint))
            let relay = try startActivated([ActivationSocket(listen: a, name: "a")], ["run", "--config", config.path])
            defer { relay.stop() }
            _ = try connectAndEcho(a, "socket\n").close()
            try relay.waitForLines(containing: "listening on", count: 2)
            #expect(relay.lines(containing: "no socket from systemd is named b: the relay binds \(own) itself").count == 1)
            _ = try connectAndEcho(own, "own\n").close()
            #expect(relay.stop() == 0)
        }
        // One unnamed socket and a relay from flags.
        do {
            let relay = try startActivated([ActivationSocket(listen: b, name: nil)], ["--listen", b.description, "--upstream", upstream.endpoint.description])
            defer { relay.stop() }
            _ = try connectAndEcho(b, "unnamed\n").close()
            try relay.waitUntilListening()
            #expect(relay.lines(containing: "relay main listening on \(b)").first?.contains("socket=systemd") == true)
            #expect(upstream.peers.last == b)
        }
    }

    @Test("Under journald (JOURNAL_STREAM names stderr) each line starts with its syslog priority; otherwise not")
    func journalPriorities() throws {
        let upstream = try TestServer(handler: TestServer.echo)
        defer { upstream.stop() }
        let listen = Endpoint(.loopbackV4, try freePort())
        // The variable must name stderr itself: sh reads the pipe's device and inode, then execs.
        let script = "JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec \"$0\" \"$@\""
        let relay = try RelayProcess(
            ["-c", script, RelayProcess.binary, "--listen", listen.description, "--upstream", upstream.endpoint.description, "--deny", "127.0.0.5"],
            executable: "/bin/sh")
        defer { relay.stop() }
        try relay.waitUntilListening()
        #expect(relay.lines(containing: "listening on").first?.hasPrefix("<6>relay main listening on \(listen)") == true, "\(relay.output)")
        // The relay resets a refused client at once: often before connect() has returned here.
        let refused = try? TestSocket.connect(to: listen, from: Endpoint(IPAddress("127.0.0.5") ?? .loopbackV4, 0))
        _ = try? refused?.waitForEnd(timeout: .seconds(5))
        let line = try relay.waitForLines(containing: "end=refused").first ?? ""
        #expect(line.hasPrefix("<5>connection ended relay=main client=127.0.0.5:"), "\(line)")

        // A start-up failure: its lines at the error priority, and ERRNO=/STATUS= for systemd.
        let notify = try NotifyListener()
        defer { notify.close() }
        let config = try SharedConfig("[[relay]]\nlisten = \"127.0.0.1:1\"\n")
        let failed = try RelayProcess(["-c", "NOTIFY_SOCKET=\(notify.path) " + script, RelayProcess.binary, "run", "--config", config.path], executable: "/bin/sh")
        #expect(failed.waitForExit(timeout: .seconds(10)) == 2)
        #expect(failed.output.split(separator: "\n").map(String.init) == [
            "<3>\(config.path):1:1: relay #1 has no upstream: add upstream = \"HOST:PORT\" (or a list of them)",
            "<3>sameport: configuration error: 1 problem in \(config.path); fix it and run 'sameport check --config \(config.path)'",
        ])
        let status = try notify.waitFor("ERRNO=") { $0["ERRNO"] != nil }
        #expect(status["ERRNO"] == "\(EINVAL)")
        #expect(status["STATUS"] == "\(config.path):1:1: relay #1 has no upstream: add upstream = \"HOST:PORT\" (or a list of them)")

        // A JOURNAL_STREAM that is not stderr (inherited by a child whose stderr was redirected).
        let plain = try RelayProcess(
            ["--listen", "127.0.0.1:\(try freePort())", "--upstream", upstream.endpoint.description],
            environment: ProcessInfo.processInfo.environment.merging(["JOURNAL_STREAM": "1:1"]) { $1 })
        defer { plain.stop() }
        try plain.waitUntilListening()
        #expect(plain.lines(containing: "listening on").first?.contains(" info relay main listening on") == true, "\(plain.output)")
    }
}
