import Dispatch
import Glibc
import Synchronization

/// Closes sockets that Dispatch sources watched without freeing their descriptor numbers at once.
///
/// libdispatch on Linux keys its epoll bookkeeping (the muxnote) by descriptor number. When a
/// socket is closed and the kernel hands the same number to the next socket within microseconds,
/// a source for the new socket can meet what is left of the old one: its registration is
/// modified instead of added and fails (EPOLL_CTL_MOD: ENOENT, seen with strace), so its events
/// never come, or the event loop follows freed state and the process crashes (seen once in CI
/// under connection churn; swift-corelibs-libdispatch #833 and #949).
///
/// So the socket itself is closed at once (dup2 of a /dev/null descriptor over its number
/// releases it: FIN or RST go out as with close), and the number stays taken by /dev/null for a
/// grace period before it is closed for real. Costs one dup2 and one deferred close per socket.
enum DescriptorGraveyard {
    /// How long a number stays parked: far longer than libdispatch takes to finish with it.
    static let grace = Duration.milliseconds(50)

    private struct Parked {
        var fd: Int32
        var since: DispatchTime
    }

    private struct State {
        var parked: [Parked] = []
        var sweepScheduled = false
    }

    private static let state = Mutex(State())
    private static let queue = DispatchQueue(label: "sameport.descriptor-graveyard")
    private static let placeholder: Int32 = open("/dev/null", O_RDONLY | O_CLOEXEC)

    /// Opens the /dev/null descriptor now, at start-up, rather than at the first close.
    static func prepare() {
        _ = placeholder
    }

    /// Releases the socket behind `fd` now and its number after `grace`.
    static func close(_ fd: Int32) {
        guard placeholder >= 0, dup2(placeholder, fd) == fd else {
            _ = Glibc.close(fd)
            return
        }
        let scheduleSweep = state.withLock { state -> Bool in
            state.parked.append(Parked(fd: fd, since: .now()))
            defer { state.sweepScheduled = true }
            return !state.sweepScheduled
        }
        if scheduleSweep { queue.asyncAfter(deadline: .now() + grace.dispatchInterval) { sweep() } }
    }

    /// Closes the numbers parked for longer than `grace`; comes back while any remain.
    private static func sweep() {
        let cutoff = DispatchTime.now() - grace.dispatchInterval
        let (due, more) = state.withLock { state -> ([Int32], Bool) in
            let due = state.parked.prefix { $0.since <= cutoff }.map(\.fd)
            state.parked.removeFirst(due.count)
            state.sweepScheduled = !state.parked.isEmpty
            return (due, state.sweepScheduled)
        }
        for fd in due { _ = Glibc.close(fd) }
        if more { queue.asyncAfter(deadline: .now() + grace.dispatchInterval) { sweep() } }
    }
}
