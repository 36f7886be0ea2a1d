import Foundation
import Glibc
import SamePortCore

/// Three network namespaces joined by veth pairs, for transparent forwarding: a client, a router
/// that runs sameport (and the nftables rules that send it the client's connections), a server.
///
/// ```
///   client                    router (sameport)                        server
///   10.0.1.2   c0 ──veth── rc 10.0.1.1   rs 10.0.2.1 ──veth── s0  10.0.2.2
///   fd00:1::2                 fd00:1::1     fd00:2::1                  fd00:2::2
///   default via the router    forwarding on                            default via the router
/// ```
///
/// Every namespace is named `sameport-tp-<role>-<pid>-<random>`; they are deleted by `remove()`
/// (call it in a `defer`) or deinit, and namespaces of this kind left by a test process that no
/// longer runs (killed before it could clean up) are deleted when the next topology is made.
/// Needs root, iproute2 and nftables (scripts/setup.sh installs them).
public final class RoutedTopology: Sendable {
    public let client: NetworkNamespace
    public let router: NetworkNamespace
    public let server: NetworkNamespace

    public static let prefix = "sameport-tp"
    private let transparentRepliesDelivered = Locked(false)

    public static let clientV4 = IPAddress("10.0.1.2")!  // literal
    public static let routerClientSideV4 = IPAddress("10.0.1.1")!  // literal
    public static let routerServerSideV4 = IPAddress("10.0.2.1")!  // literal
    public static let serverV4 = IPAddress("10.0.2.2")!  // literal
    public static let clientV6 = IPAddress("fd00:1::2")!  // literal
    public static let routerClientSideV6 = IPAddress("fd00:1::1")!  // literal
    public static let routerServerSideV6 = IPAddress("fd00:2::1")!  // literal
    public static let serverV6 = IPAddress("fd00:2::2")!  // literal

    /// Whether this process can build the topology (root, with `ip` and `nft`).
    public static var isAvailable: Bool {
        geteuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip")
            && FileManager.default.isExecutableFile(atPath: "/usr/sbin/nft")
    }

    public init() throws {
        Self.removeStale()
        client = try NetworkNamespace("\(Self.prefix)-c")
        do {
            router = try NetworkNamespace("\(Self.prefix)-r")
            do {
                server = try NetworkNamespace("\(Self.prefix)-s")
            } catch {
                router.remove()
                throw error
            }
        } catch {
            client.remove()
            throw error
        }
        do {
            try wire()
        } catch {
            remove()
            throw error
        }
    }

    deinit {
        remove()
    }

    /// Deletes the three namespaces (idempotent); their veth pairs go with them.
    public func remove() {
        client.remove()
        router.remove()
        server.remove()
    }

    private func wire() throws {
        // Each veth pair is made inside the router and its peer sent to the other namespace, so
        // the interface names never meet those of another test's topology.
        try router.run(["ip", "link", "add", "rc", "type", "veth", "peer", "name", "c0", "netns", client.name])
        try router.run(["ip", "link", "add", "rs", "type", "veth", "peer", "name", "s0", "netns", server.name])
        try router.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        try router.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        for (namespace, device, addresses) in [
            (client, "c0", ["10.0.1.2/24", "fd00:1::2/64"]),
            (router, "rc", ["10.0.1.1/24", "fd00:1::1/64"]),
            (router, "rs", ["10.0.2.1/24", "fd00:2::1/64"]),
            (server, "s0", ["10.0.2.2/24", "fd00:2::2/64"]),
        ] {
            for address in addresses {
                // nodad: an address in duplicate address detection cannot be bound yet.
                try namespace.run(["ip", "addr", "add", address, "dev", device] + (address.contains(":") ? ["nodad"] : []))
            }
            try namespace.run(["ip", "link", "set", device, "up"])
        }
        try client.run(["ip", "route", "add", "default", "via", "10.0.1.1"])
        try client.run(["ip", "-6", "route", "add", "default", "via", "fd00:1::1"])
        try server.run(["ip", "route", "add", "default", "via", "10.0.2.1"])
        try server.run(["ip", "-6", "route", "add", "default", "via", "fd00:2::1"])
    }

    /// Loads nftables rules (the text of an `nft -f` file; one rule per line) in the router.
    public func loadRules(_ rules: String) throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("sameport-nft-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).nft").path
        try rules.write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        try router.run(["nft", "-f", path])
    }

    /// REDIRECT: TCP from the client side to `port` goes to the router's own `relayPort`.
    public func redirect(port: UInt16, to relayPort: UInt16) throws {
        try loadRules("""
            table inet sameport_redirect_\(port) {
             chain prerouting {
              type nat hook prerouting priority dstnat
              iifname "rc" tcp dport \(port) redirect to :\(relayPort)
             }
            }

            """)
    }

    /// REDIRECT of the router's own connections to `port` (a `nat hook output` chain) with no
    /// guard for the relay's own port: the relay's connections come back to it, a loop.
    public func redirectOwnTraffic(port: UInt16, to relayPort: UInt16) throws {
        try loadRules("""
            table inet sameport_loop_\(port) {
             chain output {
              type nat hook output priority -100
              tcp dport \(port) redirect to :\(relayPort)
             }
            }

            """)
    }

    /// TPROXY: TCP from the client side to `port` is delivered, unchanged, to the transparent
    /// listener on `relayPort`, with `deliverTransparentReplies()`.
    ///
    /// - Parameter address: the relay's listening address, when it is not a wildcard (IPv4 only).
    public func tproxy(port: UInt16, to relayPort: UInt16, address: IPAddress? = nil) throws {
        let target = address.map { "\($0):\(relayPort)" } ?? ":\(relayPort)"
        let ipv6Rule = address == nil
            ? "  iifname \"rc\" meta nfproto ipv6 tcp dport \(port) tproxy ip6 to :\(relayPort) meta mark set 1 accept\n" : ""
        try deliverTransparentReplies()
        try loadRules("""
            table inet sameport_tproxy_\(port) {
             chain prerouting {
              type filter hook prerouting priority mangle
              iifname "rc" meta nfproto ipv4 tcp dport \(port) tproxy ip to \(target) meta mark set 1 accept
            \(ipv6Rule) }
            }

            """)
    }

    /// Packets for a transparent socket of the router (the egress of `egress = "client"`, bound
    /// to the client's address) are marked and delivered locally instead of forwarded: the
    /// `socket transparent 1` rule and a routing table for fwmark 1. Idempotent.
    public func deliverTransparentReplies() throws {
        guard !transparentRepliesDelivered.withLock({ $0 }) else { return }
        try loadRules("""
            table inet sameport_transparent_replies {
             chain prerouting {
              type filter hook prerouting priority mangle - 1
              meta l4proto tcp socket transparent 1 meta mark set 1 accept
             }
            }

            """)
        try router.run(["ip", "rule", "add", "fwmark", "1", "lookup", "100"])
        try router.run(["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"])
        try router.run(["ip", "-6", "rule", "add", "fwmark", "1", "lookup", "100"])
        try router.run(["ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100"])
        transparentRepliesDelivered.withLock { $0 = true }
    }

    /// Deletes the namespaces of topologies whose test process has ended.
    private static func removeStale() {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: "/run/netns") else { return }
        for name in names where name.hasPrefix(prefix + "-") {
            // sameport-tp-<role>-<pid>-<random>
            let parts = name.split(separator: "-")
            guard parts.count >= 2, let pid = Int32(parts[parts.count - 2]) else { continue }
            if kill(pid, 0) != 0 && errno == ESRCH {
                let process = Process()
                process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
                process.arguments = ["netns", "del", name]
                try? process.run()
                process.waitUntilExit()
            }
        }
    }
}
