import Glibc
import SamePortCore

/// A `sockaddr_storage` holding an IPv4 or IPv6 endpoint, for the calls that take one.
struct SocketAddress {
    var storage = sockaddr_storage()
    var length = socklen_t(MemoryLayout<sockaddr_storage>.size)

    init() {}

    init(_ endpoint: Endpoint) {
        switch endpoint.address {
        case .v4(let value):
            withUnsafeMutableBytes(of: &storage) { raw in
                let sin = raw.baseAddress!.assumingMemoryBound(to: sockaddr_in.self)  // storage is large and aligned enough
                sin.pointee.sin_family = sa_family_t(AF_INET)
                sin.pointee.sin_port = endpoint.port.bigEndian
                sin.pointee.sin_addr.s_addr = value.bigEndian
            }
            length = socklen_t(MemoryLayout<sockaddr_in>.size)
        case .v6:
            let bytes = endpoint.address.bytes
            withUnsafeMutableBytes(of: &storage) { raw in
                let sin6 = raw.baseAddress!.assumingMemoryBound(to: sockaddr_in6.self)  // as above
                sin6.pointee.sin6_family = sa_family_t(AF_INET6)
                sin6.pointee.sin6_port = endpoint.port.bigEndian
                withUnsafeMutableBytes(of: &sin6.pointee.sin6_addr) { $0.copyBytes(from: bytes) }
            }
            length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        }
    }

    /// The endpoint held, or nil for a family other than AF_INET and AF_INET6.
    var endpoint: Endpoint? {
        withUnsafeBytes(of: storage) { raw -> Endpoint? in
            switch Int32(storage.ss_family) {
            case AF_INET:
                let sin = raw.load(as: sockaddr_in.self)
                return Endpoint(.v4(UInt32(bigEndian: sin.sin_addr.s_addr)), UInt16(bigEndian: sin.sin_port))
            case AF_INET6:
                let sin6 = raw.load(as: sockaddr_in6.self)
                let address = withUnsafeBytes(of: sin6.sin6_addr) { IPAddress(bytes: $0) }
                return address.map { Endpoint($0, UInt16(bigEndian: sin6.sin6_port)) }
            default:
                return nil
            }
        }
    }

    /// Calls `body` with a `sockaddr` pointer and the length of the address held.
    func withSockAddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws -> R) rethrows -> R {
        try withUnsafeBytes(of: storage) { raw in
            try body(raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), length)  // non-empty buffer
        }
    }

    /// Calls `body` with a mutable `sockaddr` pointer and length, for calls that fill one in.
    mutating func withMutableSockAddr<R>(
        _ body: (UnsafeMutablePointer<sockaddr>, UnsafeMutablePointer<socklen_t>) throws -> R
    ) rethrows -> R {
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        defer { self.length = length }
        return try withUnsafeMutableBytes(of: &storage) { raw in
            try body(raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), &length)  // non-empty buffer
        }
    }
}
