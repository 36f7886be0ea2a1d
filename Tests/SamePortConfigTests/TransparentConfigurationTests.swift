import SamePortConfig
import SamePortCore
import Testing

@Suite("Configuration file: transparent forwarding")
struct TransparentConfigurationTests {
    @Test("upstream = \"original\" with destinations and transparent; egress client")
    func reads() throws {
        let specs = try Configuration(text: """
            [defaults]
            upstream = "original"
            destinations = ["10.0.0.0/8:443", "[2001:db8::]/32:80-90"]

            [[relay]]
            name = "redirected"
            listen = "*:7000"

            [[relay]]
            name = "tproxy"
            listen = "*:7001"
            transparent = true
            egress = "client-ip"

            [[relay]]
            name = "listed"
            listen = "*:7002"
            upstream = "192.0.2.1:443"
            egress = "client"
            """, path: "f.toml").relays
        #expect(specs.count == 3)
        #expect(specs[0].forwardsToOriginal && specs[0].upstreams.isEmpty && !specs[0].transparent)
        #expect(specs[0].destinations.description == "10.0.0.0/8:443, [2001:db8::]/32:80-90")
        #expect(specs[1].forwardsToOriginal && specs[1].transparent && specs[1].egress == .clientIP)
        // The relay's own upstream list replaces "original" from the defaults, and the inherited
        // destinations do not apply to it.
        let listed = try HostPort(parsing: "192.0.2.1:443")
        #expect(!specs[2].forwardsToOriginal && specs[2].upstreams == [listed])
        #expect(specs[2].egress == .client && specs[2].destinations.isEmpty)
    }

    @Test("No destinations, original in a list, bad entries and types: each at its key")
    func problemsAtTheirKeys() {
        #expect(problems("""
            [[relay]]
            listen = "*:7000"
            upstream = "original"
            """) == [
            "f.toml:3:12: upstream \"original\" with no destinations would relay clients to any address they dial (an open proxy): list the allowed ones, e.g. destinations = [\"10.0.0.0/8:443\"] (--destination 10.0.0.0/8:443), or \"0.0.0.0/0\" and \"::/0\" to allow every destination",
        ])
        #expect(problems("""
            [[relay]]
            listen = "*:7000"
            upstream = ["original", "10.0.0.1:80"]
            destinations = ["10.0.0.0/8:x", "10.0.0.0/8"]
            transparent = "yes"
            """) == [
            "f.toml:3:13: upstream \"original\" stands alone: write upstream = \"original\", not in a list with other upstreams",
            "f.toml:4:17: invalid destination '10.0.0.0/8:x': the ports 'x' are not a port from 1 to 65535 or a range FIRST-LAST; expected CIDR[:PORTS] such as 10.0.0.0/8, 192.0.2.1:443, 10.0.0.0/8:80-90 or [2001:db8::]/32:443",
            "f.toml:5:15: 'transparent' must be true or false, not a string",
        ])
        #expect(problems("""
            [[relay]]
            listen = "*:7000"
            upstream = "10.0.0.1:80"
            destinations = ["10.0.0.0/8"]
            """) == [
            "f.toml:4:16: destinations apply only to upstream \"original\": drop them, or set upstream = \"original\" (--upstream original)",
        ])
    }
}
