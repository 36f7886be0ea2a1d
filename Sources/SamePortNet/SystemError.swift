import Glibc

/// An errno value, named by meaning.
public struct Errno: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: Int32

    public init(rawValue: Int32) {
        self.rawValue = rawValue
    }

    public static let interrupted = Errno(rawValue: EINTR)
    public static let wouldBlock = Errno(rawValue: EAGAIN)
    public static let inProgress = Errno(rawValue: EINPROGRESS)
    public static let connectionReset = Errno(rawValue: ECONNRESET)
    public static let connectionRefused = Errno(rawValue: ECONNREFUSED)
    public static let connectionAborted = Errno(rawValue: ECONNABORTED)
    public static let brokenPipe = Errno(rawValue: EPIPE)
    public static let timedOut = Errno(rawValue: ETIMEDOUT)
    public static let addressInUse = Errno(rawValue: EADDRINUSE)
    public static let addressNotAvailable = Errno(rawValue: EADDRNOTAVAIL)
    public static let permissionDenied = Errno(rawValue: EACCES)
    public static let networkUnreachable = Errno(rawValue: ENETUNREACH)
    public static let hostUnreachable = Errno(rawValue: EHOSTUNREACH)
    public static let addressFamilyNotSupported = Errno(rawValue: EAFNOSUPPORT)
    public static let badDescriptor = Errno(rawValue: EBADF)
    public static let invalidArgument = Errno(rawValue: EINVAL)
    public static let notASocket = Errno(rawValue: ENOTSOCK)
    public static let badAddress = Errno(rawValue: EFAULT)
    public static let protocolError = Errno(rawValue: EPROTO)
    public static let protocolNotAvailable = Errno(rawValue: ENOPROTOOPT)
    public static let hostDown = Errno(rawValue: EHOSTDOWN)
    public static let noNetwork = Errno(rawValue: ENONET)
    public static let operationNotSupported = Errno(rawValue: EOPNOTSUPP)
    public static let networkDown = Errno(rawValue: ENETDOWN)
    public static let ioError = Errno(rawValue: EIO)
    public static let notImplemented = Errno(rawValue: ENOSYS)
    public static let notPermitted = Errno(rawValue: EPERM)

    /// The C library's text for this errno, as strerror(3) gives it.
    public var description: String { String(cString: strerror(rawValue)) }

    /// The calling thread's errno.
    static var current: Errno { Errno(rawValue: errno) }
}

/// A failed system call: which call, and the errno it left.
///
/// Prints as `connect: Connection refused (errno 111)`.
public struct SystemError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The name of the system call that failed.
    public var call: String
    public var errno: Errno

    public init(_ call: String, _ errno: Errno) {
        self.call = call
        self.errno = errno
    }

    public var description: String { "\(call): \(errno) (errno \(errno.rawValue))" }
}

/// The result of a non-blocking call: it did its work, or the kernel said EAGAIN.
enum IOResult<Value> {
    case processed(Value)
    case wouldBlock
}

/// The one funnel for system calls: retries EINTR, turns -1 into a typed `SystemError`.
@inline(__always)
func systemCall<Result: BinaryInteger>(_ name: String, _ body: () -> Result) throws(SystemError) -> Result {
    while true {
        let result = body()
        if result != -1 { return result }
        let error = Errno.current
        if error != .interrupted { throw SystemError(name, error) }
    }
}

/// Like `systemCall`, but EAGAIN comes back as `.wouldBlock` rather than an error.
@inline(__always)
func nonBlockingCall<Result: BinaryInteger>(
    _ name: String, _ body: () -> Result
) throws(SystemError) -> IOResult<Result> {
    do {
        return .processed(try systemCall(name, body))
    } catch where error.errno == .wouldBlock {
        return .wouldBlock
    }
}
