import Foundation
import Glibc
import SamePortCore

/// A test-side TCP socket: blocking calls bounded by deadlines (poll), for peers and clients.
public final class TestSocket: @unchecked Sendable {  // used by one thread at a time in each test
    public let fd: Int32
    public private(set) var isClosed = false

    public init(fd: Int32) {
        self.fd = fd
    }

    deinit {
        if !isClosed { Glibc.close(fd) }
    }

    /// A non-blocking TCP socket of the endpoint's family.
    public static func tcp(ipv6: Bool) throws -> TestSocket {
        let fd = Glibc.socket(ipv6 ? AF_INET6 : AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TestError.system("socket", errno) }
        let socket = TestSocket(fd: fd)
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        return socket
    }

    /// Connects to `endpoint`, from `source` if given, within `timeout`.
    public static func connect(
        to endpoint: Endpoint, from source: Endpoint? = nil, timeout: Duration = .seconds(5)
    ) throws -> TestSocket {
        try connect(to: endpoint, from: source, timeout: timeout, using: tcp(ipv6: endpoint.address.isIPv6))
    }

    /// Connects `socket` (already made, options set) to `endpoint`.
    public static func connect(
        to endpoint: Endpoint, from source: Endpoint? = nil, timeout: Duration = .seconds(5), using socket: TestSocket
    ) throws -> TestSocket {
        if let source {
            socket.setOption(SOL_SOCKET, SO_REUSEADDR, 1)
            try socket.bind(source)
        }
        var address = sockaddrStorage(endpoint)
        let result = withUnsafePointer(to: &address.storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(socket.fd, $0, address.length) }
        }
        if result != 0 {
            guard errno == EINPROGRESS else { throw TestError.system("connect", errno) }
            guard try socket.poll(Int16(POLLOUT), timeout: timeout) else { throw TestError.timeout("connect to \(endpoint)") }
            let error = socket.intOption(SOL_SOCKET, SO_ERROR)
            guard error == 0 else { throw TestError.system("connect", error) }
        }
        return socket
    }

    public func setOption(_ level: Int32, _ name: Int32, _ value: Int32) {
        var value = value
        _ = setsockopt(fd, level, name, &value, socklen_t(MemoryLayout<Int32>.size))
    }

    public func intOption(_ level: Int32, _ name: Int32) -> Int32 {
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        _ = getsockopt(fd, level, name, &value, &length)
        return value
    }

    /// The TCP segments this socket has received (tcp_info's tcpi_segs_in, at byte 140 of the
    /// kernel's struct since Linux 4.2; glibc's copy of the struct stops before it); nil if the
    /// kernel does not say.
    public var segmentsReceived: UInt32? {
        var info = [UInt8](repeating: 0, count: 256)
        var length = socklen_t(info.count)
        let result = info.withUnsafeMutableBytes { getsockopt(fd, Int32(IPPROTO_TCP), TCP_INFO, $0.baseAddress, &length) }
        guard result == 0, length >= 144 else { return nil }
        return info.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 140, as: UInt32.self) }
    }

    /// Sends `bytes` and the FIN in one segment: MSG_MORE holds the bytes, and shutdown(2)
    /// tacks the FIN on (as a write and close(2) arrive when the reader is slower than both).
    public func sendWithFIN(_ bytes: [UInt8]) throws {
        let sent = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_MORE | MSG_NOSIGNAL)) }
        guard sent == bytes.count else { throw TestError.system("send", errno) }
        shutdownWrite()
    }

    public func bind(_ endpoint: Endpoint) throws {
        var address = sockaddrStorage(endpoint)
        let result = withUnsafePointer(to: &address.storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, address.length) }
        }
        guard result == 0 else { throw TestError.system("bind \(endpoint)", errno) }
    }

    public var localEndpoint: Endpoint? { endpoint(getsockname) }
    public var peerEndpoint: Endpoint? { endpoint(getpeername) }

    private func endpoint(_ call: (Int32, UnsafeMutablePointer<sockaddr>, UnsafeMutablePointer<socklen_t>) -> Int32) -> Endpoint? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let result = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { call(fd, $0, &length) }
        }
        guard result == 0 else { return nil }
        return endpointFrom(storage)?.unmapped
    }

    /// Waits until `events` are ready; false on timeout.
    public func poll(_ events: Int16, timeout: Duration) throws -> Bool {
        let deadline = ContinuousClock.now + timeout
        while true {
            let remaining = deadline - ContinuousClock.now
            if remaining <= .zero { return false }
            var entry = pollfd(fd: fd, events: events, revents: 0)
            let milliseconds = Int32(min(remaining.seconds * 1000 + 1, 60_000))
            let result = Glibc.poll(&entry, 1, milliseconds)
            if result > 0 { return true }
            if result < 0, errno != EINTR { throw TestError.system("poll", errno) }
        }
    }

    /// Sends all of `bytes` within `timeout`.
    public func sendAll(_ bytes: some Collection<UInt8>, timeout: Duration = .seconds(30)) throws {
        let array = Array(bytes)
        try array.withUnsafeBytes { try sendAll($0, timeout: timeout) }
    }

    public func sendAll(_ buffer: UnsafeRawBufferPointer, timeout: Duration = .seconds(30)) throws {
        let deadline = ContinuousClock.now + timeout
        var offset = 0
        while offset < buffer.count {
            let sent = Glibc.send(fd, buffer.baseAddress! + offset, buffer.count - offset, Int32(MSG_NOSIGNAL))
            if sent > 0 { offset += sent; continue }
            if sent < 0, errno == EAGAIN || errno == EINTR {
                guard try poll(Int16(POLLOUT), timeout: deadline - ContinuousClock.now) else {
                    throw TestError.timeout("send (\(offset) of \(buffer.count) bytes sent)")
                }
                continue
            }
            throw TestError.system("send", errno)
        }
    }

    /// Sends as much as the peer accepts within `timeout`, up to `total` bytes; returns the count.
    public func sendUntilBlocked(total: Int, timeout: Duration) -> Int {
        let chunk = [UInt8](repeating: 0x5a, count: 64 * 1024)
        let deadline = ContinuousClock.now + timeout
        var sent = 0
        while sent < total, ContinuousClock.now < deadline {
            let count = chunk.withUnsafeBytes { Glibc.send(fd, $0.baseAddress!, min($0.count, total - sent), Int32(MSG_NOSIGNAL)) }
            if count > 0 { sent += count; continue }
            if count < 0, errno == EAGAIN || errno == EINTR {
                _ = try? poll(Int16(POLLOUT), timeout: min(.milliseconds(200), deadline - ContinuousClock.now))
                continue
            }
            break
        }
        return sent
    }

    /// What a read ended with.
    public enum End: Equatable, Sendable {
        case eof
        case reset
        case timeout
        case error(Int32)
    }

    /// Reads exactly `count` bytes, or fewer if the stream ends first; the end says why.
    public func receive(exactly count: Int, timeout: Duration = .seconds(30)) throws -> (bytes: [UInt8], end: End?) {
        var result = [UInt8](repeating: 0, count: count)
        var received = 0
        let deadline = ContinuousClock.now + timeout
        while received < count {
            let n = result.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress! + received, count - received, 0) }
            if n > 0 { received += n; continue }
            if n == 0 { return (Array(result[..<received]), .eof) }
            if errno == EAGAIN || errno == EINTR {
                guard try poll(Int16(POLLIN), timeout: deadline - ContinuousClock.now) else {
                    return (Array(result[..<received]), .timeout)
                }
                continue
            }
            return (Array(result[..<received]), errno == ECONNRESET ? .reset : .error(errno))
        }
        return (result, nil)
    }

    /// Reads until EOF, reset or timeout, calling `body` for each chunk; returns how it ended.
    public func receiveAll(timeout: Duration = .seconds(60), _ body: (UnsafeRawBufferPointer) -> Void) throws -> End {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 * 1024, alignment: 16)
        defer { buffer.deallocate() }
        let deadline = ContinuousClock.now + timeout
        while true {
            let n = Glibc.recv(fd, buffer.baseAddress!, buffer.count, 0)
            if n > 0 { body(UnsafeRawBufferPointer(rebasing: buffer[..<n])); continue }
            if n == 0 { return .eof }
            if errno == EAGAIN || errno == EINTR {
                guard try poll(Int16(POLLIN), timeout: deadline - ContinuousClock.now) else { return .timeout }
                continue
            }
            return errno == ECONNRESET ? .reset : .error(errno)
        }
    }

    /// Reads everything until the stream ends; returns the bytes and how it ended.
    public func receiveToEnd(timeout: Duration = .seconds(30)) throws -> (bytes: [UInt8], end: End) {
        var bytes: [UInt8] = []
        let end = try receiveAll(timeout: timeout) { bytes.append(contentsOf: $0) }
        return (bytes, end)
    }

    /// Waits for the stream to end (EOF or reset), discarding data; the end, or .timeout.
    public func waitForEnd(timeout: Duration) throws -> End {
        try receiveAll(timeout: timeout) { _ in }
    }

    public func shutdownWrite() {
        _ = Glibc.shutdown(fd, Int32(SHUT_WR))
    }

    /// Closes with RST (SO_LINGER 0).
    public func reset() {
        var value = linger(l_onoff: 1, l_linger: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &value, socklen_t(MemoryLayout<linger>.size))
        close()
    }

    public func close() {
        guard !isClosed else { return }
        isClosed = true
        Glibc.close(fd)
    }
}

/// A failure in a test helper, with what failed.
public enum TestError: Error, CustomStringConvertible {
    case system(String, Int32)
    case timeout(String)
    case failed(String)

    public var description: String {
        switch self {
        case .system(let call, let code): return "\(call): \(String(cString: strerror(code))) (errno \(code))"
        case .timeout(let what): return "timed out: \(what)"
        case .failed(let what): return what
        }
    }
}

struct SockaddrStorage {
    var storage = sockaddr_storage()
    var length: socklen_t = 0
}

func sockaddrStorage(_ endpoint: Endpoint) -> SockaddrStorage {
    var result = SockaddrStorage()
    let bytes = endpoint.address.bytes
    withUnsafeMutableBytes(of: &result.storage) { raw in
        if endpoint.address.isIPv6 {
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6)
            sin6.sin6_port = endpoint.port.bigEndian
            withUnsafeMutableBytes(of: &sin6.sin6_addr) { $0.copyBytes(from: bytes) }
            raw.storeBytes(of: sin6, as: sockaddr_in6.self)
            result.length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        } else {
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = endpoint.port.bigEndian
            withUnsafeMutableBytes(of: &sin.sin_addr) { $0.copyBytes(from: bytes) }
            raw.storeBytes(of: sin, as: sockaddr_in.self)
            result.length = socklen_t(MemoryLayout<sockaddr_in>.size)
        }
    }
    return result
}

func endpointFrom(_ storage: sockaddr_storage) -> Endpoint? {
    withUnsafeBytes(of: storage) { raw in
        switch Int32(storage.ss_family) {
        case AF_INET:
            let sin = raw.load(as: sockaddr_in.self)
            return withUnsafeBytes(of: sin.sin_addr) { IPAddress(bytes: $0) }.map { Endpoint($0, UInt16(bigEndian: sin.sin_port)) }
        case AF_INET6:
            let sin6 = raw.load(as: sockaddr_in6.self)
            return withUnsafeBytes(of: sin6.sin6_addr) { IPAddress(bytes: $0) }.map { Endpoint($0, UInt16(bigEndian: sin6.sin6_port)) }
        default:
            return nil
        }
    }
}
