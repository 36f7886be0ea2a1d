/// An IP address and a TCP port: one end of a connection.
public struct Endpoint: Hashable, Sendable, CustomStringConvertible {
    public var address: IPAddress
    public var port: UInt16

    public init(_ address: IPAddress, _ port: UInt16) {
        self.address = address
        self.port = port
    }

    /// The same endpoint with an IPv4-mapped address turned into plain IPv4.
    public var unmapped: Endpoint { Endpoint(address.unmapped, port) }

    /// `1.2.3.4:80` or `[::1]:80`.
    public var description: String {
        address.isIPv6 ? "[\(address)]:\(port)" : "\(address):\(port)"
    }
}
