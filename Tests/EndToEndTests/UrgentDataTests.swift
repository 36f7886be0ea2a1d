import Glibc
import SamePortCore
import SamePortTestSupport
import Testing

/// TCP urgent data (MSG_OOB: telnet's interrupt, FTP's abort). A read stops at the urgent mark,
/// and splice never passes it: a relay that took the short read for an empty socket, or kept
/// splicing, would hold the bytes after the mark until the peer sent more (for ever, if it waits
/// for a reply). The relay keeps the urgent byte in the stream and passes it on in place.
@Suite("Urgent data", .serialized)
struct UrgentDataTests {
    /// Sends `before`, one urgent byte, and `after` in one segment (corked), then uncorks.
    private func sendWithUrgentByte(_ socket: TestSocket, before: String, urgent: UInt8, after: String, thenClose: Bool = false) throws {
        socket.setOption(Int32(IPPROTO_TCP), TCP_CORK, 1)
        try socket.sendAll(Array(before.utf8))
        var byte = urgent
        #expect(Glibc.send(socket.fd, &byte, 1, Int32(MSG_OOB)) == 1, "send(MSG_OOB): errno \(errno)")
        try socket.sendAll(Array(after.utf8))
        if thenClose { socket.shutdownWrite() }
        socket.setOption(Int32(IPPROTO_TCP), TCP_CORK, 0)
    }

    @Test("bytes after an urgent byte arrive without more traffic, the urgent byte in its place")
    func urgentByteInTheMiddle() throws {
        let (upstream, relay, listen) = try startEchoRelay()
        defer { relay.stop(); upstream.stop() }
        let client = try TestSocket.connect(to: listen)
        defer { client.close() }
        // First some ordinary traffic, so the relay is past its first reads.
        try client.sendAll(Array("hello\n".utf8))
        #expect(try client.receive(exactly: 6, timeout: .seconds(5)).bytes == Array("hello\n".utf8))
        try sendWithUrgentByte(client, before: "abc", urgent: UInt8(ascii: "!"), after: "def")
        let reply = try client.receive(exactly: 7, timeout: .seconds(3))
        #expect(String(decoding: reply.bytes, as: UTF8.self) == "abc!def", "\(reply)")
        // And the connection goes on as before.
        try client.sendAll(Array("more\n".utf8))
        #expect(try client.receive(exactly: 5, timeout: .seconds(5)).bytes == Array("more\n".utf8))
    }

    @Test("an urgent byte right before the client's FIN: every byte arrives, then the end")
    func urgentByteThenEnd() throws {
        let (upstream, relay, listen) = try startEchoRelay()
        defer { relay.stop(); upstream.stop() }
        let client = try TestSocket.connect(to: listen)
        defer { client.close() }
        try sendWithUrgentByte(client, before: "GET", urgent: 0xFF, after: " /end", thenClose: true)
        let (bytes, end) = try client.receiveToEnd(timeout: .seconds(5))
        #expect(bytes == Array("GET".utf8) + [0xFF] + Array(" /end".utf8))
        #expect(end == .eof)
        let line = try relay.waitForLines(containing: "connection ended")[0]
        #expect(field("end", in: line) == "completed", "\(line)")
        #expect(field("bytes_to_upstream", in: line) == "9" && field("bytes_to_client", in: line) == "9", "\(line)")
    }
}
