/// Where the relay's upstream connections come from.
public enum EgressMode: Hashable, Sendable, CustomStringConvertible {
    /// From the address and port the client reached: the relay's own listening ip:P.
    case samePort
    /// From the client-reached address with a kernel-chosen port (IP_BIND_ADDRESS_NO_PORT).
    case ephemeral
    /// From a fixed ip:port given by the user; port 0 means that IP with a kernel-chosen port.
    case fixed(Endpoint)
    /// From the client's own ip:port (IP_TRANSPARENT): the upstream sees the client itself.
    case client
    /// From the client's own IP with a kernel-chosen port (IP_TRANSPARENT).
    case clientIP

    /// Whether the egress binds the client's address, which needs IP_TRANSPARENT.
    public var presentsClient: Bool { self == .client || self == .clientIP }

    /// Parses `same-port`, `ephemeral`, `client`, `client-ip` or `IP:PORT` (`[IPv6]:PORT`).
    public init(parsing text: String) throws(OptionError) {
        switch text {
        case "same-port": self = .samePort
        case "ephemeral": self = .ephemeral
        case "client": self = .client
        case "client-ip": self = .clientIP
        default:
            let expected = "expected same-port, ephemeral, client, client-ip, or a local IP:PORT such as 127.0.0.1:7000"
            let hostPort: HostPort
            do {
                hostPort = try HostPort(parsing: text)
            } catch where text.contains(":") {
                // It looks like an address: say what is wrong with it (IPv6 brackets, the port).
                throw OptionError("invalid egress '\(text)': \(error.reason); \(expected)")
            } catch {
                let reason = IPAddress(text) != nil ? "the port is missing (IP:0 lets the kernel choose one); " : ""
                throw OptionError("invalid egress '\(text)': \(reason)\(expected)")
            }
            guard let endpoint = hostPort.endpoint, !endpoint.address.isUnspecified else {
                throw OptionError("invalid egress '\(text)': \(expected)")
            }
            self = .fixed(endpoint.unmapped)
        }
    }

    public var description: String {
        switch self {
        case .samePort: return "same-port"
        case .ephemeral: return "ephemeral"
        case .fixed(let endpoint): return endpoint.description
        case .client: return "client"
        case .clientIP: return "client-ip"
        }
    }
}

/// What happens to a client when every upstream is already in use from its egress ip:P.
public enum BusyPolicy: String, CaseIterable, Hashable, Sendable {
    /// Wait, in arrival order, for a pair to free up (bounded by the connect timeout and queue limit).
    case queue
    /// Close the client at once and log why.
    case reject
    /// Dial from an ephemeral source port instead, and log it.
    case ephemeral

    /// Parses `queue`, `reject` or `ephemeral`.
    public init(parsing text: String) throws(OptionError) {
        guard let policy = BusyPolicy(rawValue: text) else {
            throw OptionError("invalid on-busy policy '\(text)': expected queue, reject or ephemeral")
        }
        self = policy
    }
}

/// How a relay moves bytes: splice(2) through a pipe per direction, or read(2)/send(2) through a buffer.
public enum SpliceMode: String, CaseIterable, Hashable, Sendable {
    /// splice(2), zero-copy; a direction where the kernel refuses it copies instead.
    case on
    /// read(2) and send(2) only.
    case off

    /// Parses `on` or `off`.
    public init(parsing text: String) throws(OptionError) {
        guard let mode = SpliceMode(rawValue: text) else {
            throw OptionError("invalid splice setting '\(text)': expected on or off")
        }
        self = mode
    }
}

/// A bad option value, with a message that names the value and what is expected.
public struct OptionError: Error, Equatable, Sendable, CustomStringConvertible {
    public var message: String

    public init(_ message: String) {
        self.message = message
    }

    public var description: String { message }
}
