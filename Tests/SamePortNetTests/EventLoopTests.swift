import CSamePortShims
import Dispatch
import Foundation
import Glibc
import SamePortCore
import SamePortTestSupport
import Synchronization
import Testing
@testable import SamePortNet

/// Records what a shard delivers to it.
private final class Log: Sendable {
    let entries = Mutex<[String]>([])
    func withLock<T>(_ body: (inout [String]) -> T) -> T { entries.withLock { body(&$0) } }
}

private final class Recorder: EventHandler, DeadlineHandler, @unchecked Sendable {  // on the shard
    let name: String
    let log: Log
    var onEvent: ((Recorder, UInt32) -> Void)?
    var onDeadline: ((Recorder) -> Void)?
    var deadlineIndex = -1
    var deadline: UInt64 = 0

    init(_ name: String, log: Log) {
        self.name = name
        self.log = log
    }

    func handle(events: UInt32, tag: UInt8) {
        log.withLock { $0.append("\(name) events \(events)") }
        onEvent?(self, events)
    }

    func deadlineReached(now: UInt64) {
        log.withLock { $0.append(name) }
        onDeadline?(self)
    }
}

/// The timer slack of the calling thread, in nanoseconds.
private func threadTimerSlack() -> Int { Int(sameport_timer_slack()) }

/// A started shard of its own with `linger`, and a socket pair: the first socket for the shard to
/// register, the second for the test.
private func startedShard(index: Int, linger: Duration) throws -> (EventLoop, Socket, Socket) {
    let loop = try EventLoop(index: index, linger: linger)
    EventLoopGroup(loops: [loop]).start()
    let (relayEnd, testEnd) = try socketPair()
    return (loop, relayEnd, testEnd)
}

private func socketPair() throws -> (Socket, Socket) {
    var fds: [Int32] = [-1, -1]
    let type = Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue)
    guard socketpair(AF_UNIX, type, 0, &fds) == 0 else { throw TestError.system("socketpair", errno) }
    return (Socket(fd: fds[0]), Socket(fd: fds[1]))
}

@Suite("Event loop: shards, registrations and deadlines", .serialized)
struct EventLoopTests {
    @Test("The deadline heap pops in deadline order, after moves and removals")
    func heapOrder() {
        let log = Log()
        var heap = DeadlineHeap()
        var generator = SystemRandomNumberGenerator()
        let handlers = (0..<500).map { Recorder("\($0)", log: log) }
        for handler in handlers { heap.set(handler, deadline: UInt64.random(in: 1...1_000_000, using: &generator)) }
        // Move a third, remove a third.
        for handler in handlers[0..<166] { heap.set(handler, deadline: UInt64.random(in: 1...1_000_000, using: &generator)) }
        for handler in handlers[166..<333] { heap.remove(handler) }
        #expect(heap.count == 500 - 167)
        var popped: [UInt64] = []
        while let due = heap.popDue(now: .max) { popped.append(due.deadline) }
        #expect(popped.count == 500 - 167)
        #expect(popped == popped.sorted())
        #expect(handlers.allSatisfy { $0.deadlineIndex == -1 })
        #expect(heap.earliest == nil)
    }

    @Test("The shards' clock is Dispatch's uptime clock, so its deadlines arm Dispatch timers as they are")
    func monotonicIsDispatchUptime() {
        for _ in 0..<100 {
            let before = DispatchTime.now().uptimeNanoseconds
            let now = Monotonic.now
            let after = DispatchTime.now().uptimeNanoseconds
            #expect(before <= now && now <= after, "\(before) \(now) \(after)")
        }
    }

    @Test("A shard waits out its linger with a long timer slack (no timer device reprogrammed per wait), and a run starts with the thread's own")
    func lingerTimerSlack() throws {
        let defaultSlack = threadTimerSlack()  // 50 µs unless the test runner was given another
        let (loop, relayEnd, testEnd) = try startedShard(index: 96, linger: .milliseconds(1))
        defer { testEnd.close() }
        let slacks = Mutex<[Int]>([])
        let recorder = Recorder("pair", log: Log())
        recorder.onEvent = { _, _ in slacks.withLock { $0.append(threadTimerSlack()) } }
        let registered = Mutex(false)
        for round in 0..<3 {
            // Past the linger: the shard's run has ended and the next one starts with this task.
            usleep(30_000)
            loop.execute {
                if round == 0 {
                    _ = try? loop.registerSocket(relayEnd, handler: recorder, tag: 0)
                    registered.withLock { $0 = true }
                }
                slacks.withLock { $0.append(threadTimerSlack()) }
                // An event for the next pass, which the shard waits for within its linger.
                var byte: UInt8 = 1
                _ = Glibc.write(testEnd.fd, &byte, 1)
            }
            #expect(waitUntil(timeout: .seconds(5)) { slacks.withLock { $0.count } == 2 * (round + 1) })
        }
        #expect(registered.withLock { $0 })
        let seen = slacks.withLock { $0 }
        // At a run's start (the task), the default; waiting within the linger (the event), 10 ms.
        #expect(seen == [defaultSlack, 10_000_000, defaultSlack, 10_000_000, defaultSlack, 10_000_000], "\(seen)")
        // A wait for a deadline sooner than the linger's end keeps the default: the deadline is
        // not put off by the slack.
        let timed = Recorder("timed", log: Log())
        let atDeadline = Mutex<Int?>(nil)
        timed.onDeadline = { _ in atDeadline.withLock { $0 = threadTimerSlack() } }
        // The event comes after a linger wait (long slack); its handler sets the deadline, so the
        // wait after it is for the deadline.
        recorder.onEvent = { _, _ in loop.setDeadline(timed, at: DispatchTime.now().uptimeNanoseconds + 400_000) }
        loop.execute {
            var byte: UInt8 = 1
            _ = Glibc.write(testEnd.fd, &byte, 1)
        }
        #expect(waitUntil(timeout: .seconds(5)) { atDeadline.withLock { $0 } != nil })
        #expect(atDeadline.withLock { $0 } == defaultSlack)
        relayEnd.close()
    }

    @Test("With a one-second linger a shard waits through a pause of 100 ms in its own epoll_wait, and gives its thread back to Dispatch after a second of quiet")
    func lingerOutlastsPauses() throws {
        let defaultSlack = threadTimerSlack()
        let (loop, relayEnd, testEnd) = try startedShard(index: 95, linger: .seconds(1))
        defer { testEnd.close() }
        let slacks = Mutex<[Int]>([])
        let recorder = Recorder("pair", log: Log())
        let registered = Mutex(false)
        loop.execute {
            _ = try? loop.registerSocket(relayEnd, handler: recorder, tag: 0)
            registered.withLock { $0 = true }
        }
        #expect(waitUntil(timeout: .seconds(5)) { registered.withLock { $0 } })
        usleep(20_000)  // the registration's own (writable) event has come and gone
        recorder.onEvent = { _, _ in slacks.withLock { $0.append(threadTimerSlack()) } }
        var byte: UInt8 = 1
        // A client's bytes 100 ms after the last event: the shard is still waiting in its own
        // epoll_wait (the linger's slack), not woken through Dispatch into a new run.
        usleep(100_000)
        _ = Glibc.write(testEnd.fd, &byte, 1)
        #expect(waitUntil(timeout: .seconds(5)) { slacks.withLock { $0.count } == 1 })
        // After more than the linger (plus its slack) of quiet the run has ended: the next event
        // starts a new one, driven by Dispatch, with the thread's own slack.
        usleep(1_300_000)
        _ = Glibc.write(testEnd.fd, &byte, 1)
        #expect(waitUntil(timeout: .seconds(5)) { slacks.withLock { $0.count } == 2 })
        #expect(slacks.withLock { $0 } == [10_000_000, defaultSlack], "\(slacks.withLock { $0 })")
        loop.execute { relayEnd.close() }
    }

    @Test("A shard wakes deadline handlers in deadline order, and not before")
    func deadlinesFire() throws {
        let loop = try EventLoop(index: 90, linger: .zero)
        let group = EventLoopGroup(loops: [loop])
        group.start()
        let log = Log()
        let handlers = ["c", "a", "b", "cancelled"].map { Recorder($0, log: log) }
        let start = DispatchTime.now().uptimeNanoseconds
        loop.execute {
            loop.setDeadline(handlers[0], at: start + 60_000_000)
            loop.setDeadline(handlers[1], at: start + 20_000_000)
            loop.setDeadline(handlers[2], at: start + 40_000_000)
            loop.setDeadline(handlers[3], at: start + 30_000_000)
            loop.cancelDeadline(handlers[3])
        }
        #expect(waitUntil(timeout: .seconds(5)) { log.withLock { $0.count } == 3 })
        let elapsed = DispatchTime.now().uptimeNanoseconds - start
        #expect(log.withLock { $0 } == ["a", "b", "c"])
        #expect(elapsed >= 60_000_000)
    }

    //   a ──(bytes)──▶ a' (registered)        b ──(bytes)──▶ b' (registered)
    // Both are readable in one batch. Whichever handler runs first closes the other's socket and
    // opens a new socket that takes its descriptor number: the event already fetched for the old
    // socket must not reach the new one.
    @Test("An event fetched for a socket closed in the same batch is dropped, even when its number is reused at once")
    func reusedNumber() throws {
        let loop = try EventLoop(index: 91, linger: .zero)
        let group = EventLoopGroup(loops: [loop])
        let log = Log()
        let (writerA, socketA) = try socketPair()
        let (writerB, socketB) = try socketPair()
        defer { [writerA, writerB].forEach { $0.close() } }
        let first = Recorder("first", log: log)
        let second = Recorder("second", log: log)
        let newcomer = Recorder("newcomer", log: log)
        /// Touched on the shard, read by the test once `reused` is set.
        final class State: @unchecked Sendable {  // under `lock`
            let lock = NSLock()
            var ids: [ObjectIdentifier: (Socket, UInt64)] = [:]
            var reused = false
            var kept: [Socket] = []
            var closed: Int32 = -1
            var numberReused = false
        }
        let state = State()
        let closeTheOther: (Recorder, UInt32) -> Void = { me, _ in
            state.lock.lock()
            defer { state.lock.unlock() }
            guard !state.reused else { return }
            state.reused = true
            let other = me === first ? second : first
            guard let (socket, id) = state.ids[ObjectIdentifier(other)] else { return }
            loop.deregister(fd: socket.fd, id: id)
            socket.close()
            state.closed = socket.fd
            // The next socket gets the lowest free number: the one just closed.
            guard let (fresh, peer) = try? socketPair() else { return }
            state.kept += [fresh, peer]
            state.numberReused = fresh.fd == socket.fd || peer.fd == socket.fd
            let reused = fresh.fd == socket.fd ? fresh : peer
            _ = try? loop.register(fd: reused.fd, events: sameport_epollin | sameport_epollet, handler: newcomer, tag: 0)
        }
        first.onEvent = closeTheOther
        second.onEvent = closeTheOther
        // Both readable before the shard looks: one epoll_wait returns both events.
        _ = Glibc.write(writerA.fd, "x", 1)
        _ = Glibc.write(writerB.fd, "y", 1)
        loop.execute {
            state.lock.lock()
            defer { state.lock.unlock() }
            if let id = try? loop.register(fd: socketA.fd, events: sameport_epollin | sameport_epollet, handler: first, tag: 0) {
                state.ids[ObjectIdentifier(first)] = (socketA, id)
            }
            if let id = try? loop.register(fd: socketB.fd, events: sameport_epollin | sameport_epollet, handler: second, tag: 0) {
                state.ids[ObjectIdentifier(second)] = (socketB, id)
            }
        }
        group.start()
        #expect(waitUntil(timeout: .seconds(5)) { state.lock.withLock { state.reused } })
        usleep(100_000)
        let events = log.withLock { $0 }
        #expect(state.lock.withLock { state.numberReused }, "the closed socket's number was not reused")
        // Exactly one of the two ran; the newcomer (no bytes to read) heard nothing.
        #expect(events.count == 1, "\(events)")
        #expect(!events.contains { $0.hasPrefix("newcomer") }, "\(events)")
        // Closed on the shard, so that no event of theirs is being handled meanwhile.
        let done = Mutex(false)
        loop.execute {
            state.lock.withLock {
                for (socket, id) in state.ids.values where socket.fd != state.closed {
                    loop.deregister(fd: socket.fd, id: id)
                    socket.close()
                }
                for socket in state.kept { socket.close() }
            }
            done.withLock { $0 = true }
        }
        #expect(waitUntil(timeout: .seconds(5)) { done.withLock { $0 } })
    }

    @Test("execute from another thread wakes a shard that waits, in order")
    func executeWakes() throws {
        let loop = try EventLoop(index: 92, linger: .milliseconds(50))
        let group = EventLoopGroup(loops: [loop])
        group.start()
        let log = Mutex<[Int]>([])
        for number in 0..<1000 {
            loop.execute { log.withLock { $0.append(number) } }
        }
        #expect(waitUntil(timeout: .seconds(5)) { log.withLock { $0.count } == 1000 })
        #expect(log.withLock { $0 } == Array(0..<1000))
        let hopped = Mutex(false)
        group.hopThroughEveryShard { hopped.withLock { $0 = true } }
        #expect(waitUntil(timeout: .seconds(5)) { hopped.withLock { $0 } })
    }

    @Test("A task that keeps deferring itself (a busy direction that yields) does not hold its shard: deadlines and other threads' work still run")
    func yieldingTaskDoesNotHoldTheShard() throws {
        let loop = try EventLoop(index: 93, linger: .milliseconds(1))
        let group = EventLoopGroup(loops: [loop])
        group.start()
        let spinner = Spinner(loop: loop)
        defer { spinner.stop.store(true, ordering: .sequentiallyConsistent) }
        loop.execute { spinner.spin() }
        #expect(waitUntil(timeout: .seconds(5)) { spinner.rounds.load(ordering: .relaxed) > 1000 })
        let log = Log()
        let recorder = Recorder("deadline", log: log)
        let start = DispatchTime.now().uptimeNanoseconds
        loop.execute { loop.setDeadline(recorder, at: start + 20_000_000) }
        let hopped = Mutex(false)
        group.hopThroughEveryShard { hopped.withLock { $0 = true } }
        #expect(waitUntil(timeout: .seconds(2)) { hopped.withLock { $0 } }, "the watchdog's hop got through")
        #expect(waitUntil(timeout: .seconds(2)) { log.withLock { $0 } == ["deadline"] }, "the deadline fired")
        #expect(spinner.rounds.load(ordering: .relaxed) > 2000, "the yielding task kept running meanwhile")
    }

    @Test("The first shard accepts alone, one accept4 per client, while clients come one at a time; the others join when clients queue up")
    func acceptSpread() throws {
        let loops = try [EventLoop(index: 94, linger: .milliseconds(1)), EventLoop(index: 95, linger: .milliseconds(1))]
        let group = EventLoopGroup(loops: loops)
        group.start()
        let listener = try Listener.open(Endpoint(.loopbackV4, 0), dualStack: false)
        let acceptedBy = Mutex<[Int]>([])
        let emptyAccepts = Mutex(0)
        listener.serve(on: group, acceptNext: { socket, loop throws(SystemError) -> Bool in
            guard let (client, _) = try socket.accept() else {
                emptyAccepts.withLock { $0 += 1 }
                return false
            }
            client.close()
            acceptedBy.withLock { $0.append(loop.index) }
            return true
        }, onFatalError: { _ in }, onTemporaryFailure: { _ in })
        listener.setAccepting(true)
        defer { listener.close() }
        // One at a time, each accepted before the next connects: the first shard takes them all.
        for count in 1...20 {
            let client = try TestSocket.connect(to: listener.endpoint)
            #expect(waitUntil(timeout: .seconds(5)) { acceptedBy.withLock { $0.count } == count })
            client.close()
        }
        #expect(acceptedBy.withLock { $0 } == Array(repeating: 94, count: 20))
        // One accept4 per client: the level-triggered listener is reported again only while
        // clients wait, so no accept is spent on finding the queue empty (EAGAIN).
        #expect(emptyAccepts.withLock { $0 } == 0)
        let spreadEarly = group.acceptSpread.load(ordering: .relaxed)
        #expect(!spreadEarly)
        // Bursts: clients queue behind the one being accepted, and the second shard joins in.
        var clients: [TestSocket] = []
        defer { for client in clients { client.close() } }
        for _ in 0..<20 {
            for _ in 0..<50 { clients.append(try TestSocket.connect(to: listener.endpoint)) }
            let expected = 20 + clients.count
            #expect(waitUntil(timeout: .seconds(5)) { acceptedBy.withLock { $0.count } == expected })
            if acceptedBy.withLock({ $0.contains(95) }) { break }
        }
        let spreadLate = group.acceptSpread.load(ordering: .relaxed)
        #expect(spreadLate)
        #expect(acceptedBy.withLock { $0.contains(95) }, "the second shard accepted once clients queued")
    }
}

/// Defers itself on its shard again and again until stopped, as a direction that always has
/// more to move does.
private final class Spinner: Sendable {
    let loop: EventLoop
    let stop = Atomic<Bool>(false)
    let rounds = Atomic<Int>(0)

    init(loop: EventLoop) {
        self.loop = loop
    }

    func spin() {
        guard !stop.load(ordering: .sequentiallyConsistent) else { return }
        rounds.add(1, ordering: .relaxed)
        loop.execute { self.spin() }
    }
}
