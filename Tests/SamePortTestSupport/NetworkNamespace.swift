import Foundation
import Glibc
import Synchronization

/// A network namespace the test creates (`ip netns add`), with its loopback up, deleted on
/// `remove()` or deinit: a private network where routes can be changed without touching the host.
public final class NetworkNamespace: Sendable {
    public let name: String

    public init(_ prefix: String = "sameport-test") throws {
        name = "\(prefix)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try Self.ip(["netns", "add", name])
        do {
            try run(["ip", "link", "set", "lo", "up"])
        } catch {
            try? Self.ip(["netns", "del", name])
            throw error
        }
    }

    deinit {
        remove()
    }

    /// Deletes the namespace (idempotent).
    public func remove() {
        try? Self.ip(["netns", "del", name])
    }

    /// Runs a command inside the namespace and waits for it (20 s at most).
    public func run(_ command: [String]) throws {
        try Self.ip(["netns", "exec", name] + command)
    }

    /// The prefix that runs a process inside the namespace, for `RelayProcess`.
    public var prefix: [String] { ["ip", "netns", "exec", name] }

    /// Runs `body` on a thread that has joined the namespace: sockets it creates live there.
    ///
    /// setns(2) changes only the calling thread's namespace, so a fresh thread is used and ends
    /// with the call; the sockets it made keep their namespace wherever they are used afterwards.
    public func withThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) throws -> T {
        let result = Mutex<Result<T, Error>?>(nil)
        let path = "/run/netns/\(name)"
        let thread = Thread {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0, let setns = Self.setns, setns(fd, Self.cloneNewNet) == 0 else {
                let error = TestError.system("setns \(path)", errno)
                if fd >= 0 { close(fd) }
                result.withLock { $0 = .failure(error) }
                return
            }
            close(fd)
            let outcome = Result { try body() }
            result.withLock { $0 = outcome }
        }
        thread.start()
        guard waitUntil(timeout: .seconds(30), { result.withLock { $0 != nil } }),
              let outcome = result.withLock({ $0 }) else {
            throw TestError.timeout("work in network namespace \(name)")
        }
        return try outcome.get()
    }

    /// setns(2), looked up at run time: Glibc's Swift module hides it (a GNU extension).
    private static let setns: (@convention(c) (Int32, Int32) -> Int32)? = {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "setns") else { return nil }
        return unsafeBitCast(symbol, to: (@convention(c) (Int32, Int32) -> Int32).self)
    }()
    private static let cloneNewNet: Int32 = 0x4000_0000  // CLONE_NEWNET, <sched.h>

    private static func ip(_ arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        process.arguments = arguments
        let pipe = Pipe()
        process.standardError = pipe
        process.standardOutput = pipe
        try process.run()
        guard waitUntil(timeout: .seconds(20), { !process.isRunning }) else {
            process.terminate()
            throw TestError.timeout("ip \(arguments.joined(separator: " "))")
        }
        guard process.terminationStatus == 0 else {
            let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            throw TestError.failed("ip \(arguments.joined(separator: " ")): \(output)")
        }
    }
}
