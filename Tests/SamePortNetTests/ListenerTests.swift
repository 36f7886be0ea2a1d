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
        #expect(throws: StartupError("cannot listen on \(first.endpoint): Address already in use: another process is listening on port \(first.endpoint.port); stop it or choose another listen port", errno: .addressInUse)) {
            _ = try Listener.open(first.endpoint, dualStack: false)
        }
        // The egress of the relay can still bind beside it: SO_REUSEPORT is on.
        try EgressBinding.fixed(first.endpoint).makeSocket().close()
    }
}
