import Glibc
import SamePortConfig
import SamePortCore

/// Reading `--config FILE` into relay specs, for `run` and `check`.
enum ConfigFile {
    /// The relays in the file at `path`.
    ///
    /// - Throws: a `StartFailure` (exit 2) listing every problem as `FILE:LINE:COLUMN: message`,
    ///   or saying why the file cannot be read.
    static func load(_ argument: String) throws(StartFailure) -> [RelaySpec] {
        // `-` is standard input, named as compilers name it.
        let path = argument == "-" ? "<stdin>" : argument
        let text = try read(argument == "-" ? nil : path, named: path)
        do {
            return try Configuration(text: text, path: path).relays
        } catch {
            let count = error.problems.count
            throw StartFailure(
                messages: ["configuration error: \(count) problem\(count == 1 ? "" : "s") in \(path); fix \(count == 1 ? "it" : "them") and run 'sameport check --config \(argument)'"],
                exitCode: 2,
                details: error.problems.map(\.description))
        }
    }

    /// The text of the file at `path`, or of standard input when `path` is nil.
    private static func read(_ file: String?, named path: String) throws(StartFailure) -> String {
        let fd = file.map { Glibc.open($0, O_RDONLY | O_CLOEXEC) } ?? STDIN_FILENO
        guard fd >= 0 else { throw unreadable(path, errno) }
        defer { if file != nil { Glibc.close(fd) } }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                throw unreadable(path, errno)
            }
            if count == 0 { break }
            bytes.append(contentsOf: chunk[..<count])
            // A configuration file is small; refuse to swallow a device or a log by mistake.
            guard bytes.count <= 16 << 20 else {
                throw StartFailure(message: "configuration error: \(path) is larger than 16 MiB: is it the configuration file?", exitCode: 2)
            }
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw StartFailure(message: "configuration error: \(path) is not UTF-8 text: save it as UTF-8", exitCode: 2)
        }
        return text
    }

    private static func unreadable(_ path: String, _ code: Int32) -> StartFailure {
        let reason = String(cString: strerror(code))
        let hint = code == ENOENT ? "check the path" : code == EACCES ? "check its permissions" : code == EISDIR ? "give the file, not its directory" : "check the file"
        return StartFailure(messages: ["configuration error: cannot read \(path): \(reason) (errno \(code)); \(hint)"], exitCode: 2, errno: code)
    }
}
