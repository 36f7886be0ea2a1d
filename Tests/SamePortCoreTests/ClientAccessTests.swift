import SamePortCore
import Testing

@Suite("CIDR blocks and client access")
struct ClientAccessTests {
    private func cidr(_ text: String) throws -> CIDR { try CIDR(parsing: text) }
    private func ip(_ text: String) -> IPAddress { IPAddress(text) ?? .anyV4 }

    @Test("Blocks contain the addresses under their prefix, of their own family only")
    func contains() throws {
        #expect(try cidr("10.0.0.0/8").contains(ip("10.255.1.2")))
        #expect(try !cidr("10.0.0.0/8").contains(ip("11.0.0.1")))
        #expect(try cidr("127.0.0.2").contains(ip("127.0.0.2")))
        #expect(try !cidr("127.0.0.2").contains(ip("127.0.0.3")))
        #expect(try cidr("0.0.0.0/0").contains(ip("192.0.2.1")))
        #expect(try !cidr("0.0.0.0/0").contains(ip("::1")))
        #expect(try cidr("::/0").contains(ip("2001:db8::1")))
        #expect(try cidr("fd00::/8").contains(ip("fdab::1")))
        #expect(try !cidr("fd00::/8").contains(ip("fe80::1")))
        #expect(try cidr("2001:db8::/96").contains(ip("2001:db8::ffff:1")))
        #expect(try !cidr("2001:db8::/96").contains(ip("2001:db8::1:0:0:1")))
        #expect(try cidr("2001:db8:0:1::/64").contains(ip("2001:db8:0:1:ffff::1")))
        #expect(try !cidr("2001:db8:0:1::/64").contains(ip("2001:db8:0:2::1")))
        #expect(try cidr("::1").contains(ip("::1")))
        // A client of a dual-stack listener arrives IPv4-mapped and matches as IPv4.
        #expect(try cidr("127.0.0.0/8").contains(ip("::ffff:127.0.0.3")))
        #expect(try cidr("10.0.0.0/31").description == "10.0.0.0/31")
        // A block written IPv4-mapped is the IPv4 block, so that it matches IPv4 clients.
        #expect(try cidr("::ffff:127.0.0.2").description == "127.0.0.2/32")
        #expect(try cidr("::ffff:10.0.0.0/104").description == "10.0.0.0/8")
        #expect(try cidr("::ffff:127.0.0.2").contains(ip("127.0.0.2")))
    }

    @Test("Malformed blocks are refused with the reason and the fix", arguments: [
        ("10.0.0.0/33", "invalid CIDR '10.0.0.0/33': the prefix length '33' is not a number from 0 to 32"),
        ("::/129", "invalid CIDR '::/129': the prefix length '129' is not a number from 0 to 128"),
        ("10.0.0.0/", "invalid CIDR '10.0.0.0/': the prefix length '' is not a number from 0 to 32"),
        ("10.0.0.0/-1", "invalid CIDR '10.0.0.0/-1': the prefix length '-1' is not a number from 0 to 32"),
        ("example.com/8", "invalid CIDR 'example.com/8': 'example.com' is not an IPv4 or IPv6 address; expected ADDRESS/PREFIX such as 10.0.0.0/8 or fd00::/8"),
        ("", "invalid CIDR '': '' is not an IPv4 or IPv6 address; expected ADDRESS/PREFIX such as 10.0.0.0/8 or fd00::/8"),
        ("10.1.0.0/8", "invalid CIDR '10.1.0.0/8': the address has bits set past the /8 prefix; did you mean 10.0.0.0/8?"),
        ("fd00::1/8", "invalid CIDR 'fd00::1/8': the address has bits set past the /8 prefix; did you mean fd00::/8?"),
    ])
    func malformed(text: String, message: String) {
        #expect(throws: OptionError(message)) { try CIDR(parsing: text) }
    }

    @Test("Deny wins over allow; an empty allow list allows everyone")
    func access() throws {
        let open = ClientAccess()
        #expect(open.isOpen)
        #expect(open.refusal(of: ip("192.0.2.1")) == nil)

        let rules = ClientAccess(allow: [try cidr("127.0.0.0/8"), try cidr("::1")], deny: [try cidr("127.0.0.3")])
        #expect(rules.refusal(of: ip("127.0.0.2")) == nil)
        #expect(rules.refusal(of: ip("::1")) == nil)
        #expect(rules.refusal(of: ip("127.0.0.3")) == "the client is in deny 127.0.0.3/32")
        #expect(rules.refusal(of: ip("::2")) == "the client is in no allow block (127.0.0.0/8, ::1/128)")

        let denyOnly = ClientAccess(deny: [try cidr("::/0")])
        #expect(denyOnly.refusal(of: ip("127.0.0.1")) == nil)
        #expect(denyOnly.refusal(of: ip("::1")) == "the client is in deny ::/0")
    }
}
