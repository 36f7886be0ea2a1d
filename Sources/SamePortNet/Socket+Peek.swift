import Glibc

extension Socket {
    /// recv(2) with MSG_PEEK: copies what the socket holds into `buffer` without taking it;
    /// `.processed(0)` is EOF with nothing left to read.
    func peek(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> IOResult<Int> {
        try nonBlockingCall("recv") { Glibc.recv(fd, buffer.baseAddress, buffer.count, Int32(MSG_PEEK)) }
    }

    /// Reads and drops the next `count` bytes, which a `peek` has shown are there, using `scratch`.
    /// False if fewer could be read (the peer reset meanwhile).
    func discard(_ count: Int, using scratch: UnsafeMutableRawBufferPointer) -> Bool {
        var left = count
        while left > 0 {
            let chunk = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<min(left, scratch.count)])
            guard case .processed(let read)? = try? self.read(into: chunk), read > 0 else { return false }
            left -= read
        }
        return true
    }
}
