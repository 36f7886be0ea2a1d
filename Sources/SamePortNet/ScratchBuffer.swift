import Glibc

/// A buffer per thread that the copy path reads into when its direction holds nothing.
///
/// Most reads are written on at once and in full (every short exchange, and a bulk transfer while
/// the receiver keeps up), so the bytes need no home of their own; a direction copies what the
/// receiving socket could not take into a buffer of its own, and only then. An idle connection
/// thus holds no buffer at all, and a busy one holds one only while its receiver lags.
///
/// The PROXY header reader peeks into it too (`ProxyHeaderReader`), done with it before it hands
/// the client on.
///
/// Safe because a pump runs start to end on one thread and gives the scratch back (all written, or
/// copied out) before it returns. The memory lives as long as the thread (a Dispatch worker) and
/// is freed with it.
enum ScratchBuffer {
    private struct Header {
        var size: Int
    }

    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        _ = pthread_key_create(&key) { free($0) }
        return key
    }()

    /// This thread's scratch, at least `size` bytes.
    static func current(size: Int) -> UnsafeMutableRawBufferPointer? {
        let headerSize = MemoryLayout<Header>.stride
        if let existing = pthread_getspecific(key) {
            let header = existing.assumingMemoryBound(to: Header.self)
            if header.pointee.size >= size {
                return UnsafeMutableRawBufferPointer(start: existing + headerSize, count: size)
            }
            _ = pthread_setspecific(key, nil)
            free(existing)
        }
        guard let allocated = malloc(headerSize + size) else { return nil }
        allocated.assumingMemoryBound(to: Header.self).pointee = Header(size: size)
        _ = pthread_setspecific(key, allocated)
        return UnsafeMutableRawBufferPointer(start: allocated + headerSize, count: size)
    }
}
