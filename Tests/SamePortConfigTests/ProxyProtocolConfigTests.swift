import SamePortConfig
import SamePortCore
import Testing

@Suite("Configuration file: the PROXY protocol keys")
struct ProxyProtocolConfigTests {
    @Test("proxy_protocol, accept_proxy, accept_proxy_from and proxy_timeout are read, inherited and overridden ('off')")
    func keys() throws {
        let specs = try Configuration(text: """
            [defaults]
            upstream = "127.0.0.1:9000"
            proxy_protocol = "v2"
            accept_proxy_from = ["127.0.0.1", "10.0.0.0/8"]

            [[relay]]
            name = "front"
            listen = "127.0.0.1:7000"
            accept_proxy = true
            proxy_timeout = "2s"

            [[relay]]
            name = "plain"
            listen = "127.0.0.1:7001"
            proxy_protocol = "off"

            [[relay]]
            name = "text"
            listen = "127.0.0.1:7002"
            proxy_protocol = "v1"
            """, path: "f.toml").relays
        #expect(specs.count == 3)
        #expect(specs[0].proxyProtocol == .v2)
        #expect(specs[0].acceptProxy)
        #expect(specs[0].acceptProxyFrom == [try CIDR(parsing: "127.0.0.1"), try CIDR(parsing: "10.0.0.0/8")])
        #expect(specs[0].proxyTimeout == .seconds(2))
        // A trust list in [defaults] is for the relays that turn accept_proxy on.
        #expect(specs[1].proxyProtocol == nil)
        #expect(!specs[1].acceptProxy)
        #expect(specs[1].proxyTimeout == RelaySpec.defaultProxyTimeout)
        #expect(specs[2].proxyProtocol == .v1)
    }

    @Test("accept_proxy needs accept_proxy_from; a relay's own accept_proxy_from needs accept_proxy; bad values at their keys")
    func problemsAtTheirKeys() {
        #expect(problems("""
            [[relay]]
            name = "a"
            listen = "127.0.0.1:7000"
            upstream = "127.0.0.1:9000"
            accept_proxy = true

            [[relay]]
            name = "b"
            listen = "127.0.0.1:7001"
            upstream = "127.0.0.1:9000"
            accept_proxy_from = ["127.0.0.1"]

            [[relay]]
            name = "c"
            listen = "127.0.0.1:7002"
            upstream = "127.0.0.1:9000"
            proxy_protocol = "v3"
            accept_proxy = "yes"
            accept_proxy_from = ["127.0.0.1/8"]
            proxy_timeout = "0s"
            """) == [
            "f.toml:5:16: accept_proxy needs accept_proxy_from: list the proxies trusted to announce clients (whoever may send a header may claim any address), for example accept_proxy_from = [\"127.0.0.1\"] (--accept-proxy-from 127.0.0.1)",
            "f.toml:11:21: accept_proxy_from without accept_proxy: the headers would be relayed as the client's bytes; add accept_proxy = true (--accept-proxy), or drop accept_proxy_from",
            "f.toml:17:18: invalid proxy_protocol 'v3': expected v1, v2 or off",
            "f.toml:18:16: 'accept_proxy' must be true or false, not a string",
            "f.toml:19:22: invalid CIDR '127.0.0.1/8': the address has bits set past the /8 prefix; did you mean 127.0.0.0/8?",
            "f.toml:20:17: the PROXY header timeout must be above 0 (for example 5s)",
        ])
    }
}
