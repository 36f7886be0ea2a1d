import Glibc
import SamePortConfig
import SamePortCore

/// Reading `--config FILE` into relay specs, for `run` and `check`.
enum ConfigFile {
    /// The whole file: its relays and its process-wide settings (`threads`).
    ///
    /// - Throws: a `StartFailure` (exit 2) listing every problem as `FILE:LINE:COLUMN: message`,
    ///   or saying why the file cannot be read.
    static func loadConfiguration(_ argument: String) throws(StartFailure) -> Configuration {
        // `-` is standard input, named as compilers name it.
        let path = argument == "-" ? "<stdin>" : argument
        let bytes = try read(argument == "-" ? nil : path, named: path)
        do {
            return try Configuration(bytes: bytes, path: path)
        } catch {
            let count = error.problems.count
            throw StartFailure(
                messages: ["configuration error: \(count) problem\(count == 1 ? "" : "s") in \(path); fix \(count == 1 ? "it" : "them") and run 'sameport check --config \(argument)'"],
                exitCode: 2,
                details: error.problems.map(\.description))
        }
    }

    /// The bytes of the file at `path` (of standard input when `path` is nil), at most one more
    /// than `ConfigurationLimits.fileSize`: enough for `Configuration` to say it is too large.
    ///
    /// A path that is not a regular file is refused without blocking: open(2) with O_NONBLOCK
    /// returns at once for a FIFO that has no writer (a plain open waits for one, for ever), and
    /// fstat(2) on the open fd then says what it is (no race with a rename between the two).
    private static func read(_ file: String?, named path: String) throws(StartFailure) -> [UInt8] {
        let fd: Int32
        if let file {
            fd = Glibc.open(file, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
            guard fd >= 0 else { throw unreadable(path, errno) }
        } else {
            fd = STDIN_FILENO
        }
        defer { if file != nil { Glibc.close(fd) } }
        if file != nil {
            var status = stat()
            guard fstat(fd, &status) == 0 else { throw unreadable(path, errno) }
            let type = status.st_mode & S_IFMT
            guard type == S_IFREG else {
                throw StartFailure(
                    messages: ["configuration error: \(path) is \(describe(type)), not a regular file: give the path of the configuration file itself"],
                    exitCode: 2)
            }
        }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while bytes.count <= ConfigurationLimits.fileSize {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                throw unreadable(path, errno)
            }
            if count == 0 { break }
            bytes.append(contentsOf: chunk[..<count])
        }
        return bytes
    }

    /// What a file type from `st_mode & S_IFMT` is, with its article.
    private static func describe(_ type: mode_t) -> String {
        switch type {
        case S_IFDIR: return "a directory"
        case S_IFIFO: return "a FIFO (named pipe), which would block the read until a writer comes"
        case S_IFCHR: return "a character device"
        case S_IFBLK: return "a block device"
        case S_IFSOCK: return "a socket"
        default: return "a special file"
        }
    }

    private static func unreadable(_ path: String, _ code: Int32) -> StartFailure {
        let reason = String(cString: strerror(code))
        let hint = code == ENOENT ? "check the path" : code == EACCES ? "check its permissions" : code == EISDIR ? "give the file, not its directory" : "check the file"
        return StartFailure(messages: ["configuration error: cannot read \(path): \(reason) (errno \(code)); \(hint)"], exitCode: 2, errno: code)
    }
}
