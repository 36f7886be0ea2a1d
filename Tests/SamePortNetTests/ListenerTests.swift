import Dispatch
import Glibc
import SamePortCore
import SamePortTestSupport
import Testing
@testable import SamePortNet

@Suite("Listener")
struct ListenerTests {
    @Test("The listener is bound with SO_REUSEPORT, and refuses a port another socket holds")
    func exclusiveProbe() throws {
        _ = ignoreSIGPIPE
        let first = try Listener.open(Endpoint(.loopbackV4, try freePort()), dualStack: false)
        defer { first.close() }
        #expect(throws: StartupError("cannot listen on \(first.endpoint): Address already in use: another socket holds port \(first.endpoint.port) (a listener, or a connection using it as its local port: ss -tanp 'sport = :\(first.endpoint.port)' shows which); stop its process or choose another listen port", errno: .addressInUse)) {
            _ = try Listener.open(first.endpoint, dualStack: false)
        }
        // The egress of the relay can still bind beside it: SO_REUSEPORT is on.
        try EgressBinding.fixed(first.endpoint).makeSocket().close()
    }
}
