import SamePortCore
import Testing

@Suite("Destinations: the allow list of upstream \"original\"")
struct DestinationsTests {
    private func rule(_ text: String) throws -> DestinationRule { try DestinationRule(parsing: text) }
    private func endpoint(_ address: String, _ port: UInt16) -> Endpoint { Endpoint(IPAddress(address) ?? .anyV4, port) }

    @Test("Entries are a block, with an optional port or port range; IPv6 with ports in brackets", arguments: [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.0.2.1:443", "192.0.2.1/32:443"),
        ("10.0.0.0/8:80-90", "10.0.0.0/8:80-90"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("[2001:db8::]/32:80-90", "[2001:db8::]/32:80-90"),
        ("[2001:db8::1]:443", "[2001:db8::1]/128:443"),
        ("[2001:db8::/32]:443", "[2001:db8::]/32:443"),
        ("::/0", "::/0"),
        ("0.0.0.0/0", "0.0.0.0/0"),
    ])
    func parsing(text: String, description: String) throws {
        #expect(try rule(text).description == description)
        // What it prints reads back as the same rule.
        #expect(try rule(rule(text).description) == rule(text))
    }

    @Test("Malformed entries are refused with the reason and the accepted forms", arguments: [
        ("10.0.0.0/8:0", "invalid destination '10.0.0.0/8:0': the ports '0' are not a port from 1 to 65535 or a range FIRST-LAST; expected CIDR[:PORTS] such as 10.0.0.0/8, 192.0.2.1:443, 10.0.0.0/8:80-90 or [2001:db8::]/32:443"),
        ("10.0.0.0/8:", "invalid destination '10.0.0.0/8:': the ports '' are not a port from 1 to 65535 or a range FIRST-LAST; expected CIDR[:PORTS] such as 10.0.0.0/8, 192.0.2.1:443, 10.0.0.0/8:80-90 or [2001:db8::]/32:443"),
        ("10.0.0.0/8:90-80", "invalid destination '10.0.0.0/8:90-80': the port range 90-80 is backwards; write 80-90"),
        ("10.0.0.0/8:http", "invalid destination '10.0.0.0/8:http': the ports 'http' are not a port from 1 to 65535 or a range FIRST-LAST; expected CIDR[:PORTS] such as 10.0.0.0/8, 192.0.2.1:443, 10.0.0.0/8:80-90 or [2001:db8::]/32:443"),
        ("10.1.0.0/8", "invalid destination '10.1.0.0/8': the address has bits set past the /8 prefix; did you mean 10.0.0.0/8?"),
        ("[2001:db8::1", "invalid destination '[2001:db8::1': the ']' after the IPv6 address is missing; expected CIDR[:PORTS] such as 10.0.0.0/8, 192.0.2.1:443, 10.0.0.0/8:80-90 or [2001:db8::]/32:443"),
        ("[2001:db8::1]443", "invalid destination '[2001:db8::1]443': unexpected '443' after the address; expected CIDR[:PORTS] such as 10.0.0.0/8, 192.0.2.1:443, 10.0.0.0/8:80-90 or [2001:db8::]/32:443"),
        ("example.com:443", "invalid destination 'example.com:443': 'example.com' is not an IPv4 or IPv6 address; expected ADDRESS/PREFIX such as 10.0.0.0/8 or fd00::/8"),
    ])
    func malformed(text: String, message: String) {
        #expect(throws: OptionError(message)) { try DestinationRule(parsing: text) }
    }

    @Test("A destination is allowed when a rule holds its address and port; empty allows nothing")
    func refusal() throws {
        let destinations = Destinations([try rule("10.0.0.0/8:443"), try rule("192.0.2.1"), try rule("[2001:db8::]/32:80-90")])
        #expect(destinations.refusal(of: endpoint("10.1.2.3", 443)) == nil)
        #expect(destinations.refusal(of: endpoint("10.1.2.3", 80)) == "the original destination 10.1.2.3:80 is in no destinations entry (10.0.0.0/8:443, 192.0.2.1/32, [2001:db8::]/32:80-90)")
        #expect(destinations.refusal(of: endpoint("192.0.2.1", 1)) == nil)
        #expect(destinations.refusal(of: endpoint("192.0.2.2", 1)) != nil)
        #expect(destinations.refusal(of: endpoint("2001:db8:1::1", 85)) == nil)
        #expect(destinations.refusal(of: endpoint("2001:db8:1::1", 91)) != nil)
        // A redirected IPv4 client of a dual-stack socket may be reported IPv4-mapped.
        #expect(destinations.refusal(of: endpoint("::ffff:10.0.0.1", 443)) == nil)
        #expect(Destinations().refusal(of: endpoint("10.0.0.1", 443)) == "the original destination 10.0.0.1:443 is in no destinations entry (none)")
    }

    @Test("Original destinations are booked per (egress, destination) pair: a second one from the same ip:P is busy")
    func bookings() throws {
        var selector = UpstreamSelector(upstreams: [])
        let egress = endpoint("10.0.2.1", 7000)
        guard case .reserved(let first) = selector.reserve(egress: egress, destination: endpoint("10.0.2.2", 80)) else {
            Issue.record("not reserved")
            return
        }
        #expect(first.isOriginalDestination)
        #expect(first.addresses == [endpoint("10.0.2.2", 80)])
        #expect(selector.reserve(egress: egress, destination: endpoint("10.0.2.2", 80)) == .busy)
        #expect(selector.reserve(egress: egress, destination: endpoint("10.0.2.2", 81)) != .busy)
        // A kernel-chosen port books nothing.
        #expect(selector.reserve(egress: nil, destination: endpoint("10.0.2.2", 80)) != .busy)
        selector.release(first)
        #expect(selector.reserve(egress: egress, destination: endpoint("10.0.2.2", 80)) != .busy)
    }

    @Test("A relay forwarding to original destinations needs destinations, and no listed upstream")
    func specProblems() throws {
        let listen = try HostPort(parsing: "*:7000")
        #expect(RelaySpec(listen: listen, upstreams: [], forwardsToOriginal: true).problems() == [
            "upstream \"original\" with no destinations would relay clients to any address they dial (an open proxy): list the allowed ones, e.g. destinations = [\"10.0.0.0/8:443\"] (--destination 10.0.0.0/8:443), or \"0.0.0.0/0\" and \"::/0\" to allow every destination"])
        let allowed = Destinations([try rule("10.0.0.0/8")])
        #expect(RelaySpec(listen: listen, upstreams: [], forwardsToOriginal: true, destinations: allowed).problems().isEmpty)
        #expect(RelaySpec(listen: listen, upstreams: [try HostPort(parsing: "10.0.0.1:80")], forwardsToOriginal: true, destinations: allowed).problems() == [
            "upstream \"original\" cannot be listed with other upstreams: give either \"original\" or HOST:PORT upstreams"])
        #expect(RelaySpec(listen: listen, upstreams: [try HostPort(parsing: "10.0.0.1:80")], destinations: allowed).problems() == [
            "destinations apply only to upstream \"original\": drop them, or set upstream = \"original\" (--upstream original)"])
    }

    @Test("egress client and client-ip parse and print back")
    func egressModes() throws {
        #expect(try EgressMode(parsing: "client") == .client)
        #expect(try EgressMode(parsing: "client-ip") == .clientIP)
        #expect(EgressMode.client.description == "client")
        #expect(EgressMode.clientIP.description == "client-ip")
        #expect(EgressMode.client.presentsClient && EgressMode.clientIP.presentsClient && !EgressMode.samePort.presentsClient)
    }
}
