import Foundation
import Glibc
import Synchronization

/// A test's own NOTIFY_SOCKET: an AF_UNIX datagram socket in a fresh directory, recording every
/// message a service sends with sd_notify(3), with the time it arrived.
public final class NotifyListener: @unchecked Sendable {  // `fd` is read by one thread; state under locks
    /// One datagram: its `KEY=value` lines, and when it came (CLOCK_MONOTONIC).
    public struct Message: Sendable, CustomStringConvertible {
        public var assignments: [String: String]
        public var text: String
        public var monotonicMicroseconds: UInt64

        public subscript(key: String) -> String? { assignments[key] }
        public var description: String { text.replacingOccurrences(of: "\n", with: " | ") }
    }

    /// The socket's path: the value for NOTIFY_SOCKET.
    public let path: String
    private let directory: String
    private let fd: Int32
    private let received = Mutex<[Message]>([])
    private let stopped = Atomic<Bool>(false)
    private let readerDone = Atomic<Bool>(false)

    /// Binds the socket; any user may send to it (for services run as nobody).
    public init() throws {
        var template = Array("/tmp/sameport-notify-XXXXXX".utf8CString)
        guard let created = mkdtemp(&template) else { throw TestError.failed("mkdtemp: \(errno)") }
        directory = String(cString: created)
        chmod(directory, 0o755)
        path = directory + "/notify"
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TestError.failed("socket(AF_UNIX): \(errno)") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in path.utf8.enumerated() where index < raw.count - 1 { raw[index] = byte }
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0 else {
            let code = errno
            Glibc.close(fd)
            throw TestError.failed("bind \(path): \(code)")
        }
        chmod(path, 0o777)
        var timeout = timeval(tv_sec: 0, tv_usec: 100_000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        Thread { [self] in
            var buffer = [UInt8](repeating: 0, count: 65536)
            while !stopped.load(ordering: .sequentiallyConsistent) {
                let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                guard count > 0 else { continue }
                let text = String(decoding: buffer[..<count], as: UTF8.self)
                var assignments: [String: String] = [:]
                for line in text.split(separator: "\n") {
                    let parts = line.split(separator: "=", maxSplits: 1)
                    assignments[String(parts[0])] = parts.count > 1 ? String(parts[1]) : ""
                }
                let message = Message(assignments: assignments, text: text, monotonicMicroseconds: Self.monotonicMicroseconds())
                received.withLock { $0.append(message) }
            }
            readerDone.store(true, ordering: .sequentiallyConsistent)
        }.start()
    }

    /// Every message so far, in arrival order.
    public var messages: [Message] { received.withLock { $0 } }

    /// Waits until a message satisfies `condition`, among those after the first `after` received;
    /// returns it, or throws on timeout.
    @discardableResult
    public func waitFor(timeout: Duration = .seconds(10), after: Int = 0, _ what: String, _ condition: (Message) -> Bool) throws -> Message {
        var found: Message?
        _ = waitUntil(timeout: timeout) {
            found = messages.dropFirst(after).first(where: condition)
            return found != nil
        }
        guard let found else { throw TestError.timeout("a notification with \(what); got: \(messages.map(\.description))") }
        return found
    }

    public static func monotonicMicroseconds() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) * 1_000_000 + UInt64(now.tv_nsec) / 1_000
    }

    /// Stops the reader and removes the socket and its directory.
    public func close() {
        stopped.store(true, ordering: .sequentiallyConsistent)
        _ = waitUntil(timeout: .seconds(2)) { readerDone.load(ordering: .sequentiallyConsistent) }
        Glibc.close(fd)
        unlink(path)
        rmdir(directory)
    }

    deinit {
        if !stopped.load(ordering: .sequentiallyConsistent) { close() }
    }
}
