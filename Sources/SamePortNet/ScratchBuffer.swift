import CSamePortShims

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
/// is freed with it (`sameport_scratch`).
enum ScratchBuffer {
    /// This thread's scratch, at least `size` bytes.
    static func current(size: Int) -> UnsafeMutableRawBufferPointer? {
        sameport_scratch(size).map { UnsafeMutableRawBufferPointer(start: $0, count: size) }
    }
}
