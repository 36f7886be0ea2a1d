import SamePortCore
import Testing

@Suite("SelfDial")
struct SelfDialCoreTests {
    private let isLoopback: (IPAddress) -> Bool = { $0.isLoopback }

    private func endpoint(_ text: String, _ port: UInt16) -> Endpoint {
        Endpoint(IPAddress(text) ?? .anyV4, port)
    }

    @Test("the listen address itself, its mapped form and 0.0.0.0 reach the listener; another port or address does not")
    func specificListener() {
        let listener = endpoint("127.0.0.1", 7000)
        #expect(SelfDial.reaches(endpoint("127.0.0.1", 7000), listener: listener, isLocal: isLoopback))
        #expect(SelfDial.reaches(endpoint("::ffff:127.0.0.1", 7000), listener: listener, isLocal: isLoopback))
        #expect(SelfDial.reaches(endpoint("0.0.0.0", 7000), listener: listener, isLocal: isLoopback))
        #expect(!SelfDial.reaches(endpoint("127.0.0.1", 7001), listener: listener, isLocal: isLoopback))
        #expect(!SelfDial.reaches(endpoint("127.0.0.2", 7000), listener: listener, isLocal: isLoopback))
    }

    @Test("a wildcard listener is reached on every local address of its port, of the families it takes")
    func wildcardListener() {
        let dualStack = endpoint("::", 7000)
        #expect(SelfDial.reaches(endpoint("127.0.0.9", 7000), listener: dualStack, isLocal: isLoopback))
        #expect(SelfDial.reaches(endpoint("::1", 7000), listener: dualStack, isLocal: isLoopback))
        #expect(!SelfDial.reaches(endpoint("192.0.2.1", 7000), listener: dualStack, isLocal: isLoopback))
        #expect(!SelfDial.reaches(endpoint("127.0.0.9", 7000), listener: dualStack, acceptsIPv4: false, isLocal: isLoopback))
        #expect(!SelfDial.reaches(endpoint("::1", 7000), listener: endpoint("0.0.0.0", 7000), isLocal: isLoopback))
    }

    @Test("RelaySpec names a literal upstream that is its own listen address")
    func specProblem() throws {
        let spec = RelaySpec(
            listen: try HostPort(parsing: "*:7000"),
            upstreams: [try HostPort(parsing: "192.0.2.1:7000"), try HostPort(parsing: "[::1]:7000")])
        let problems = spec.fieldProblems()
        #expect(problems.map(\.field) == [.upstreamIsListener(index: 1)])
        #expect(problems.map(\.message) == ["upstream [::1]:7000 is the relay's own listen address *:7000: the relay would dial itself; give the upstream's own address, or listen on another port"])
    }
}
