import Foundation
import Glibc
import SamePortCore
import Synchronization

/// A loopback TCP server on its own threads: accepts with a deadline-bounded poll loop and runs
/// `handler` on a new thread per connection. Records the peer address of every connection.
public final class TestServer: Sendable {
    public let endpoint: Endpoint
    private let listener: TestSocket
    private let stopping = Flag()
    private let peerList = Locked<[Endpoint]>([])
    private let active = Counter()
    private let acceptThreadDone = Flag()

    /// Listens on `endpoint` (port 0 for any free port); `dualStack` for `[::]` accepting IPv4 too.
    public init(
        _ endpoint: Endpoint = Endpoint(.loopbackV4, 0), dualStack: Bool = false, backlog: Int32 = 1024,
        handler: @escaping @Sendable (TestSocket) -> Void
    ) throws {
        let socket = try TestSocket.tcp(ipv6: endpoint.address.isIPv6)
        socket.setOption(SOL_SOCKET, SO_REUSEADDR, 1)
        if endpoint.address.isIPv6 { socket.setOption(Int32(IPPROTO_IPV6), IPV6_V6ONLY, dualStack ? 0 : 1) }
        try socket.bind(endpoint)
        guard Glibc.listen(socket.fd, backlog) == 0 else { throw TestError.system("listen", errno) }
        listener = socket
        guard let bound = socket.localEndpoint else { throw TestError.failed("getsockname") }
        self.endpoint = bound
        // The thread holds the pieces it needs, not the server, so that dropping the server
        // (or calling stop) ends it.
        let thread = Thread { [listener, stopping, peerList, active, acceptThreadDone] in
            defer { acceptThreadDone.set() }
            while !stopping.value {
                guard (try? listener.poll(Int16(POLLIN), timeout: .milliseconds(50))) == true else { continue }
                let fd = Glibc.accept(listener.fd, nil, nil)
                guard fd >= 0 else { continue }
                let client = TestSocket(fd: fd)
                _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
                if let peer = client.peerEndpoint { peerList.withLock { $0.append(peer) } }
                active.add(1)
                Thread {
                    handler(client)
                    client.close()
                    active.add(-1)
                }.start()
            }
        }
        thread.start()
    }

    /// The peer (source) address of each accepted connection, in accept order.
    public var peers: [Endpoint] { peerList.withLock { $0 } }

    /// Connections whose handler is still running.
    public var activeConnections: Int { active.value }

    /// Stops accepting, waits for the accept thread, and closes the listener.
    public func stop() {
        stopping.set()
        let deadline = ContinuousClock.now + .seconds(5)
        while !acceptThreadDone.value, ContinuousClock.now < deadline {
            usleep(1000)
        }
        listener.close()
    }

    deinit {
        stop()
    }

    /// A handler that echoes everything until EOF, then closes.
    public static let echo: @Sendable (TestSocket) -> Void = { socket in
        _ = try? socket.receiveAll(timeout: .seconds(120)) { chunk in
            try? socket.sendAll(chunk, timeout: .seconds(60))
        }
    }

    /// A handler that holds the connection open until the peer closes it.
    public static let hold: @Sendable (TestSocket) -> Void = { socket in
        _ = try? socket.waitForEnd(timeout: .seconds(120))
    }
}

/// A free TCP port on loopback (bound once to port 0, then released).
public func freePort(_ address: IPAddress = .loopbackV4) throws -> UInt16 {
    let socket = try TestSocket.tcp(ipv6: address.isIPv6)
    try socket.bind(Endpoint(address, 0))
    defer { socket.close() }
    guard let port = socket.localEndpoint?.port else { throw TestError.failed("getsockname") }
    return port
}

/// Waits until `condition` holds, checking every few milliseconds, up to `timeout`.
public func waitUntil(timeout: Duration, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try condition() { return true }
        usleep(5000)
    }
    return try condition()
}

/// Ignores SIGPIPE once for the test process: a write to a reset peer must fail, not kill it.
public let ignoreSIGPIPE: Void = {
    signal(SIGPIPE, SIG_IGN)
}()

/// A flag shared between threads (Atomic and Mutex are not copyable, so they cannot be captured).
public final class Flag: Sendable {
    private let storage = Atomic<Bool>(false)
    public init() {}
    public var value: Bool { storage.load(ordering: .sequentiallyConsistent) }
    public func set() { storage.store(true, ordering: .sequentiallyConsistent) }
}

/// A counter shared between threads.
public final class Counter: Sendable {
    private let storage = Atomic<Int>(0)
    public init() {}
    public var value: Int { storage.load(ordering: .sequentiallyConsistent) }
    public func add(_ delta: Int) { storage.add(delta, ordering: .sequentiallyConsistent) }
}

/// A value behind a lock, shared between threads.
public final class Locked<Value: Sendable>: Sendable {
    private let storage: Mutex<Value>
    public init(_ value: Value) { storage = Mutex(value) }
    public func withLock<R: Sendable>(_ body: (inout sending Value) -> R) -> R { storage.withLock { body(&$0) } }
}
