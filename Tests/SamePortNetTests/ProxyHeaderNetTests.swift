import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Testing
@testable import SamePortNet

/// The socket-level pieces of the PROXY protocol: the header is peeked and taken exactly, and the
/// rest of a header the upstream did not take at once is delivered before the client's bytes.
@Suite("PROXY protocol: peek, discard and a preloaded direction", .serialized)
struct ProxyHeaderNetTests {
    @Test("A peek leaves the bytes in the socket; discarding the header's length leaves the client's bytes after it, all of them")
    func peekAndDiscard() throws {
        let topology = try Topology()
        defer { withExtendedLifetime(topology) {} }  // its deinit closes the sockets
        let header = Array("PROXY TCP4 192.0.2.7 127.0.0.1 5555 80\r\n".utf8)
        let payload = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 13) }
        let sender = topology.sender
        let writer = Thread { try? sender.sendAll(header + payload); sender.shutdownWrite() }
        writer.start()
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: ProxyHeaderParser.maximumLength, alignment: 16)
        defer { scratch.deallocate() }
        var answer = ProxyHeaderParse.needMore
        #expect(waitUntil(timeout: .seconds(10)) {
            guard case .processed(let count)? = try? topology.from.peek(into: scratch) else { return false }
            answer = ProxyHeaderParser.parse(UnsafeRawBufferPointer(rebasing: scratch[0..<count]))
            return answer != .needMore
        })
        guard case .header(_, let length) = answer else {
            Issue.record("answer \(answer)")
            return
        }
        #expect(length == header.count)
        // Peeked twice: still there.
        guard case .processed(let again)? = try? topology.from.peek(into: scratch) else {
            Issue.record("second peek failed")
            return
        }
        #expect(again >= header.count)
        #expect(topology.from.discard(length, using: scratch))
        var rest: [UInt8] = []
        #expect(waitUntil(timeout: .seconds(10)) {
            while case .processed(let count)? = try? topology.from.read(into: scratch), count > 0 {
                rest.append(contentsOf: scratch[0..<count])
            }
            return rest.count >= payload.count
        })
        #expect(rest == payload)
    }

    @Test("Preloaded bytes (a PROXY header's rest) are delivered before the sender's, on the copy and the splice path, and counted",
          arguments: [0, 1])
    func preload(path: Int) throws {
        let topology = try Topology()
        defer { withExtendedLifetime(topology) {} }  // its deinit closes the sockets
        var direction = Direction(fromSide: .client, capacity: 4096, pipeSize: DirectionTests.paths[path].pipeSize, spliceAfter: 0, now: 0)
        defer { direction.release() }
        let preloaded = Array("PROXY TCP4 192.0.2.7 127.0.0.1 5555 80\r\n".utf8).dropFirst(10)
        direction.preload(preloaded)
        let payload = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let sender = topology.sender
        let writer = Thread { try? sender.sendAll(payload); sender.shutdownWrite() }
        writer.start()
        guard case .finished = pumpToEnd(&direction, from: topology.from, to: topology.to) else {
            Issue.record("the direction did not finish")
            return
        }
        let (bytes, end) = try topology.receiver.receiveToEnd(timeout: .seconds(10))
        #expect(end == .eof)
        #expect(bytes == Array(preloaded) + payload)
        #expect(direction.bytes == UInt64(preloaded.count + payload.count))
    }
}
