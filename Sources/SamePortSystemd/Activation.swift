import CSystemd
import Glibc

/// A listening socket passed by systemd (socket activation), with the name the .socket unit gave
/// it (FileDescriptorName=, by default the unit's name).
public struct PassedSocket: Sendable, Equatable {
    public var fd: Int32
    /// nil when systemd gave no names (LISTEN_FDNAMES unset: libsystemd says "unknown").
    public var name: String?

    public init(fd: Int32, name: String?) {
        self.fd = fd
        self.name = name
    }

    /// The name as a message says it: `socket 3 "proxy"`.
    public var label: String {
        name.map { "socket \(fd) \"\($0)\"" } ?? "socket \(fd)"
    }

    /// True when the socket is a listening TCP socket (sd_is_socket_inet), as ListenStream= makes.
    public var isListeningStream: Bool {
        sd_is_socket_inet(fd, AF_UNSPEC, Int32(SOCK_STREAM.rawValue), 1, 0) > 0
    }
}

/// Socket activation (sd_listen_fds(3)).
public enum Activation {
    /// The sockets systemd passed (LISTEN_FDS, LISTEN_FDNAMES, checked against LISTEN_PID), in fd
    /// order from 3; empty when the process was not socket-activated. The variables are removed
    /// from the environment, so that nothing started later takes them for its own.
    ///
    /// - Parameter warn: told why sockets in the environment are not this process's to take
    ///   (LISTEN_PID missing or naming another process: a wrapper that forked instead of exec'ing).
    public static func passedSockets(warn: (String) -> Void) throws(ActivationError) -> [PassedSocket] {
        // libsystemd answers a foreign LISTEN_PID with "no sockets" and malformed variables with a
        // bare errno: read them first, so that each case can be told with its cause.
        let environment = ListenEnvironment()
        if let ignored = environment.ignoredBecause { warn(ignored) }
        var names: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?
        let count = sd_listen_fds_with_names(1, &names)
        guard count >= 0 else {
            throw ActivationError(message: "cannot take the sockets passed by systemd: \(environment.diagnosis(-count))")
        }
        defer {
            if let names {
                for index in 0..<Int(count) { free(names[index]) }
                free(names)
            }
        }
        return (0..<count).map { index in
            let name = names?[Int(index)].map { String(cString: $0) }
            return PassedSocket(fd: SD_LISTEN_FDS_START + index, name: name == "unknown" || name == "" ? nil : name)
        }
    }
}

/// LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES as the process found them, to explain what libsystemd
/// refuses or ignores.
struct ListenEnvironment {
    var pid: String?
    var fds: String?
    var names: String?

    init() {
        func value(_ name: String) -> String? { getenv(name).map { String(cString: $0) } }
        pid = value("LISTEN_PID")
        fds = value("LISTEN_FDS")
        names = value("LISTEN_FDNAMES")
    }

    /// Why LISTEN_FDS is set but its sockets are not this process's; nil when they are, or when
    /// there are none.
    var ignoredBecause: String? {
        guard let fds else { return nil }
        let mine = getpid()
        let fix = "the sockets are ignored; make sameport the service's main process (ExecStart=sameport ..., or exec it from a wrapper script) so that systemd passes them to it"
        guard let pid else {
            return "LISTEN_FDS=\(fds) is set without LISTEN_PID: \(fix)"
        }
        guard let number = Int32(pid) else { return nil }  // malformed: diagnosis(_:) says so
        guard number == mine else {
            return "LISTEN_FDS=\(fds) is for process \(pid) (LISTEN_PID), not this one (\(mine)): \(fix)"
        }
        return nil
    }

    /// What is wrong with the variables, for libsystemd's error `code`, and the cure.
    func diagnosis(_ code: Int32) -> String {
        let fix = "start sameport from a .socket unit, or unset LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID"
        if let pid, Int32(pid) == nil {
            return "LISTEN_PID=\(pid) is not a process ID: \(fix)"
        }
        let first = Int(SD_LISTEN_FDS_START)
        guard let fds, let count = Int(fds), count > 0, count <= Int(Int32.max) - first else {
            return "LISTEN_FDS=\(fds ?? "") is not a number of sockets: \(fix)"
        }
        if let closed = (first..<first + count).lazy.first(where: { fcntl(Int32($0), F_GETFD) < 0 }) {
            return "LISTEN_FDS=\(fds) passes descriptors \(first) to \(first + count - 1), but \(closed) is not open (closed before sameport started?): \(fix)"
        }
        if let names {
            let nameCount = names.split(separator: ":", omittingEmptySubsequences: false).count
            if nameCount != count {
                return "LISTEN_FDNAMES=\(names) names \(nameCount) socket\(nameCount == 1 ? "" : "s"), but LISTEN_FDS=\(fds) passes \(count): give every socket one name (FileDescriptorName=), or \(fix)"
            }
        }
        return "\(String(cString: strerror(code))) (errno \(code)): \(fix)"
    }
}

public struct ActivationError: Error, Sendable {
    public var message: String
}
