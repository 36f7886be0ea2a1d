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
    public static func passedSockets() throws(ActivationError) -> [PassedSocket] {
        var names: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?
        let count = sd_listen_fds_with_names(1, &names)
        guard count >= 0 else {
            throw ActivationError(message: "cannot read the sockets passed by systemd (LISTEN_FDS, LISTEN_FDNAMES): \(String(cString: strerror(-count)))")
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

public struct ActivationError: Error, Sendable {
    public var message: String
}
