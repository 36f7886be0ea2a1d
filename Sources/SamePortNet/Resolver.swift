import CSamePortShims
import Glibc
import SamePortCore

/// Host name resolution with getaddrinfo(3), done once at start-up.
public enum Resolver {
    /// The addresses of `hostPort`, IPv4 and IPv6, in the resolver's order, without repeats.
    public static func resolve(_ hostPort: HostPort) throws(StartupError) -> [Endpoint] {
        switch hostPort.host {
        case .ip(let address):
            return [Endpoint(address, hostPort.port).unmapped]
        case .any:
            throw StartupError("cannot dial '\(hostPort)': '*' is for listening; name the upstream's host")
        case .name(let name):
            var hints = addrinfo()
            hints.ai_family = AF_UNSPEC
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            var list: UnsafeMutablePointer<addrinfo>?
            let status = getaddrinfo(name, String(hostPort.port), &hints, &list)
            guard status == 0 else {
                let reason = String(cString: gai_strerror(status))
                if status == EAI_AGAIN {
                    throw StartupError("cannot resolve upstream '\(hostPort)' yet: \(reason); the resolver is not answering, try again (under systemd: After=network-online.target)", isTemporary: true, errno: .wouldBlock)
                }
                throw StartupError("cannot resolve upstream '\(hostPort)': \(reason); check the name or give an IP address")
            }
            defer { freeaddrinfo(list) }
            var endpoints: [Endpoint] = []
            var entry = list
            while let current = entry {
                if let sockaddr = current.pointee.ai_addr {
                    var address = SocketAddress()
                    withUnsafeMutableBytes(of: &address.storage) { storage in
                        let length = min(Int(current.pointee.ai_addrlen), storage.count)
                        storage.copyMemory(from: UnsafeRawBufferPointer(start: sockaddr, count: length))
                    }
                    if let endpoint = address.endpoint?.unmapped, !endpoints.contains(endpoint) {
                        endpoints.append(endpoint)
                    }
                }
                entry = current.pointee.ai_next
            }
            guard !endpoints.isEmpty else {
                throw StartupError("cannot resolve upstream '\(hostPort)': no IPv4 or IPv6 address")
            }
            return endpoints
        }
    }
}

/// Limits of the process that the relay adjusts at start-up.
public enum ProcessLimits {
    /// Raises the soft RLIMIT_NOFILE to the hard limit: each connection needs two descriptors for
    /// its sockets, and two more for each direction that splices (its pipe).
    ///
    /// - Returns: the soft limit in force afterwards.
    @discardableResult
    public static func raiseOpenFileLimit() -> UInt64 {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 0 }
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { return UInt64(raised.rlim_cur) }
        }
        return UInt64(limit.rlim_cur)
    }

    /// Ignores SIGPIPE: a write to a reset peer must be an error, never the end of the process.
    public static func ignoreSIGPIPE() {
        signal(SIGPIPE, SIG_IGN)
    }
}
