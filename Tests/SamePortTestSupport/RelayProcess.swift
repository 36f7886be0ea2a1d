import Foundation
import Glibc
import Synchronization

/// A `sameport` process started by a test: its stderr lines, its PID, and a bounded stop.
public final class RelayProcess: @unchecked Sendable {  // `process` is only touched under `lock`
    public let pid: Int32
    private let process: Process
    private let lock = Mutex<Void>(())
    private let text = Mutex<String>("")
    private let readerDone = Atomic<Bool>(false)

    /// The built `sameport` executable, beside the test bundle (or $SAMEPORT_BIN).
    public static var binary: String {
        if let path = ProcessInfo.processInfo.environment["SAMEPORT_BIN"] { return path }
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        return URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("sameport").path
    }

    /// The path that relays started with quick flags (`--listen`) and no `--splice` or
    /// `--splice-after` of their own are given, from SAMEPORT_TEST_SPLICE:
    /// - unset or `on`: `--splice-after 0`, splice from the first byte. By default a direction
    ///   copies its first 256 KiB, which would leave most tests on the read/write path.
    /// - `off`: `--splice off`, the read/write path.
    /// - `default`: nothing added (copy, then splice after 256 KiB, as users run it).
    public static var pathFlags: [String] {
        switch ProcessInfo.processInfo.environment["SAMEPORT_TEST_SPLICE"] {
        case "off": ["--splice", "off"]
        case "default": []
        default: ["--splice-after", "0"]
        }
    }

    /// True when SAMEPORT_TEST_SPLICE=off.
    public static var spliceOff: Bool {
        ProcessInfo.processInfo.environment["SAMEPORT_TEST_SPLICE"] == "off"
    }

    /// Starts `executable` (the sameport binary by default) with `arguments`.
    ///
    /// - Parameter prefix: a command to run it under, e.g. `["setpriv", "--reuid=65534", ...]`.
    public init(_ arguments: [String], prefix: [String] = [], executable: String = RelayProcess.binary,
                environment: [String: String]? = nil) throws {
        var arguments = arguments
        if arguments.contains("--listen"), !arguments.contains("--config"),
           !arguments.contains("--splice"), !arguments.contains("--splice-after") {
            arguments += Self.pathFlags
        }
        let process = Process()
        if prefix.isEmpty {
            process.executableURL = URL(fileURLWithPath: executable)
            process.arguments = arguments
        } else {
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments = prefix + [executable] + arguments
        }
        if let environment { process.environment = environment }
        let pipe = Pipe()
        process.standardError = pipe
        process.standardOutput = pipe
        process.standardInput = FileHandle.nullDevice
        try process.run()
        self.process = process
        pid = process.processIdentifier
        let fd = pipe.fileHandleForReading.fileDescriptor
        let writer = pipe.fileHandleForWriting
        try? writer.close()
        let reader = pipe.fileHandleForReading
        Thread { [self] in
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
                if n < 0, errno == EINTR { continue }
                if n <= 0 { break }
                let chunk = String(decoding: buffer[..<n], as: UTF8.self)
                text.withLock { $0 += chunk }
            }
            try? reader.close()
            readerDone.store(true, ordering: .sequentiallyConsistent)
        }.start()
    }

    /// Everything the process wrote to stdout and stderr so far.
    public var output: String { text.withLock { $0 } }

    /// The lines written so far that contain `needle`.
    public func lines(containing needle: String) -> [String] {
        output.split(separator: "\n").map(String.init).filter { $0.contains(needle) }
    }

    /// Waits for `count` lines containing `needle`; returns them, or throws on timeout.
    @discardableResult
    public func waitForLines(containing needle: String, count: Int = 1, timeout: Duration = .seconds(10)) throws -> [String] {
        var found: [String] = []
        let ok = waitUntil(timeout: timeout) {
            found = lines(containing: needle)
            return found.count >= count || !isRunning && readerDone.load(ordering: .sequentiallyConsistent)
        }
        guard ok, found.count >= count else {
            throw TestError.timeout("\(count) line(s) containing '\(needle)' (found \(found.count)); output:\n\(output)")
        }
        return found
    }

    /// Waits for the "listening on" line that follows a successful start.
    public func waitUntilListening(timeout: Duration = .seconds(10)) throws {
        try waitForLines(containing: "listening on", timeout: timeout)
    }

    public var isRunning: Bool { lock.withLock { _ in process.isRunning } }

    /// Waits for the process to exit; its exit status, or nil on timeout.
    public func waitForExit(timeout: Duration) -> Int32? {
        guard waitUntil(timeout: timeout, { !isRunning }) else { return nil }
        _ = waitUntil(timeout: .seconds(2)) { readerDone.load(ordering: .sequentiallyConsistent) }
        return lock.withLock { _ in process.terminationStatus }
    }

    /// Sends `signal`, waits up to `timeout`, then SIGKILL; returns the exit status (nil if killed).
    /// SIGINT by default: sameport stops at once, cutting open connections; SIGTERM would let
    /// them drain first (up to --drain-timeout).
    @discardableResult
    public func stop(signal: Int32 = SIGINT, timeout: Duration = .seconds(10)) -> Int32? {
        guard isRunning else { return waitForExit(timeout: .seconds(1)) }
        kill(pid, signal)
        if let status = waitForExit(timeout: timeout) { return status }
        kill(pid, SIGKILL)
        _ = waitForExit(timeout: .seconds(5))
        return nil
    }

    deinit {
        if process.isRunning {
            kill(pid, SIGKILL)
            process.waitUntilExit()
        }
    }

    /// The number of open file descriptors of the process.
    public func openFileDescriptors() -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
    }

    /// The number of open file descriptors of the process whose /proc link starts with one of
    /// `prefixes` (`socket:`, `pipe:`, `anon_inode:`...).
    public func openFileDescriptors(linkingTo prefixes: [String]) -> Int {
        let directory = "/proc/\(pid)/fd"
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: directory) else { return -1 }
        return entries.filter { entry in
            let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/\(entry)")) ?? ""
            return prefixes.contains { target.hasPrefix($0) }
        }.count
    }

    /// The open pipes of the process (`pipe:[inode]`): its stdout and stderr, and the splice
    /// path's pipes.
    public func openPipes() -> Int {
        openFileDescriptors(linkingTo: ["pipe:"])
    }

    /// The numbers of the process's open file descriptors.
    public func openFileDescriptorNumbers() -> Set<Int32> {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
        return Set(entries.compactMap { Int32($0) })
    }

    /// Lowers the process's open-file limit (prlimit) so that exactly `free` descriptor numbers
    /// stay free below it: RLIMIT_NOFILE bounds descriptor numbers, and those open above it stay
    /// open. Throws if prlimit fails.
    public func limitDescriptors(leavingFree free: Int) throws {
        let open = openFileDescriptorNumbers()
        var limit: Int32 = 0
        var left = 0
        while left < free {
            if !open.contains(limit) { left += 1 }
            limit += 1
        }
        let prlimit = try RelayProcess(["--pid", "\(pid)", "--nofile=\(limit):\(limit)"], executable: "/usr/bin/prlimit")
        guard prlimit.waitForExit(timeout: .seconds(10)) == 0 else {
            throw TestError.failed("prlimit --nofile=\(limit): \(prlimit.output)")
        }
    }

    /// The process's resident set size in KiB (VmRSS).
    public func residentKiB() -> Int {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return -1 }
        for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") ?? -1
        }
        return -1
    }
}
