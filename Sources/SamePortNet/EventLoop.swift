import CSamePortShims
import Dispatch
import Glibc
import Synchronization

/// Receives the events of the sockets it registered with a shard.
protocol EventHandler: AnyObject {
    /// Called on the shard's queue with the epoll flags of one socket; `tag` is what the handler
    /// gave when it registered that socket (which of its sockets it is).
    func handle(events: UInt32, tag: UInt8)
}

/// Woken by its shard at a deadline. The shard keeps the two properties: the handler only
/// stores them (an index into the shard's deadline heap, and the deadline itself).
protocol DeadlineHandler: AnyObject {
    var deadlineIndex: Int { get set }
    var deadline: UInt64 { get set }
    /// Called on the shard's queue once the deadline has passed.
    func deadlineReached(now: UInt64)
}

/// One shard: a serial Dispatch queue that owns an epoll set, and everything registered in it.
///
/// Design note (see shared/design/event-loop.md): libdispatch's per-descriptor sources crash and
/// lose events under connection churn, so no Dispatch object exists per connection. A shard has
/// exactly three long-lived Dispatch objects: its queue, one read source on its epoll descriptor
/// (an epoll set is itself pollable), and one timer for the earliest deadline of its connections.
/// - Every socket is registered once, edge-triggered (EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET), when it
///   is created, and leaves the set when it is closed (a connection's socket: close(2) removes it,
///   as nginx relies on; a socket that stays open, a listener or a client handed on: EPOLL_CTL_DEL).
///   Handlers read and write until EAGAIN and remember what they wait for; nothing is re-armed and
///   no interest is toggled.
/// - epoll's data is a registration id (slot index and generation), never the bare descriptor: an
///   event already fetched for a socket that was closed meanwhile, whose number may already belong
///   to a new socket, no longer matches its slot and is dropped.
/// - Deadlines (connect, backoff, queue wait, idle, accept pause) live in one binary heap with
///   removal by index; the shard's timer is armed for the earliest.
/// - Other threads hand work to the shard through `execute`: an inbox and an eventfd in the set,
///   which wakes the shard whether it waits in Dispatch or in its own epoll_wait.
/// - Linger: after handling events the loop keeps waiting in epoll_wait for up to `linger` of
///   quiet (1 ms by default) before it returns to Dispatch. The thread sleeps in the kernel
///   meanwhile; a socket event then costs one wake-up instead of Dispatch's three-thread hand-off,
///   which on an idle virtual machine's CPUs adds 100-250 µs to a connection that comes after a
///   longer pause. A busy run returns to Dispatch after `maximumRun`, so Dispatch drives the
///   shard again.
///
/// Concurrency: everything but `execute` runs on `queue` (`@unchecked Sendable` for that reason),
/// and the state only the queue touches skips the runtime exclusivity check (see `Connection`).
final class EventLoop: @unchecked Sendable {  // confined to `queue`, but for `execute`
    /// The shard's number, for names and logs.
    let index: Int
    let queue: DispatchQueue
    private let epollFD: Int32
    private let wakeFD: Int32
    /// Made at activation, never before: libdispatch aborts the process when an object that was
    /// never activated is released (a shard made by a group whose next shard failed to start).
    @exclusivity(unchecked) private var source: DispatchSourceRead?
    @exclusivity(unchecked) private var timer: DispatchSourceTimer?
    private let linger: UInt64
    /// A busy run of the loop returns to Dispatch after this long (a quiet one after the linger).
    private static let maximumRun: UInt64 = 10_000_000
    /// The timer slack of a wait for the linger's end (see `run`): one tick at the lowest common
    /// HZ (100).
    private static let lingerSlack: UInt = 10_000_000
    private static let batch: Int32 = 64
    /// The registration id of the wake-up eventfd (no slot has it).
    private static let wakeID = UInt64.max

    private struct Slot {
        var generation: UInt32 = 0
        var tag: UInt8 = 0
        var handler: (any EventHandler)?
    }
    @exclusivity(unchecked) private var slots: [Slot] = []
    @exclusivity(unchecked) private var freeSlots: [UInt32] = []
    @exclusivity(unchecked) private var heap = DeadlineHeap()
    /// The deadline the Dispatch timer is armed for (UInt64.max: none).
    @exclusivity(unchecked) private var armedDeadline = UInt64.max
    /// Whether the events being handled came from a look asked for by `lookNext`, and whether one
    /// is asked for: an acceptor asks for a non-blocking look right after taking a client, and a
    /// listener that look reports had clients queueing behind it (see `Acceptor`).
    @exclusivity(unchecked) private(set) var lastWaitWasLook = false
    @exclusivity(unchecked) private var lookAskedFor = false
    /// Work for this shard from this shard: run before the loop next waits.
    @exclusivity(unchecked) private var deferred: [@Sendable () -> Void] = []
    private let events: UnsafeMutablePointer<sameport_epoll_event>

    /// Told when the group's accept spread changes (the acceptors of this shard).
    @exclusivity(unchecked) private var spreadWatchers: [ObjectIdentifier: () -> Void] = [:]

    /// Work from other threads, and whether the eventfd has been written since the loop last
    /// emptied the inbox.
    private let inbox = Mutex<[@Sendable () -> Void]>([])
    private let wakePending = Atomic<Bool>(false)

    private static let key = DispatchSpecificKey<Int>()

    /// - Parameter linger: how long the loop waits for more events before it returns to Dispatch.
    init(index: Int, linger: Duration) throws(SystemError) {
        self.index = index
        self.linger = UInt64(max(0, linger.nanoseconds))
        let epollFD = try systemCall("epoll_create1") { sameport_epoll_create() }
        var wakeFD: Int32 = -1
        do throws(SystemError) {
            wakeFD = try systemCall("eventfd") { sameport_eventfd() }
            _ = try systemCall("epoll_ctl") {
                sameport_epoll_ctl(epollFD, sameport_epoll_ctl_add, wakeFD, sameport_epollin | sameport_epollet, Self.wakeID)
            }
        } catch {
            if wakeFD >= 0 { Glibc.close(wakeFD) }
            Glibc.close(epollFD)
            throw error
        }
        self.epollFD = epollFD
        self.wakeFD = wakeFD
        queue = DispatchQueue(label: "sameport.shard.\(index)")
        queue.setSpecific(key: Self.key, value: index)
        events = .allocate(capacity: Int(Self.batch))
    }

    /// Only a shard that was never activated goes away (its group failed to start): no Dispatch
    /// object watches its descriptors.
    deinit {
        guard source == nil else { return }
        Glibc.close(wakeFD)
        Glibc.close(epollFD)
        events.deallocate()
    }

    /// Starts the Dispatch source and timer: the first Dispatch thread starts here, so this waits
    /// until start-up has dropped what only the main thread may keep (capabilities).
    fileprivate func activate() {
        let source = DispatchSource.makeReadSource(fileDescriptor: epollFD, queue: queue)
        let timer = DispatchSource.makeTimerSource(queue: queue)
        source.setEventHandler { [unowned self] in run(fromEvent: true) }
        timer.setEventHandler { [unowned self] in
            armedDeadline = .max
            run(fromEvent: false)
        }
        // Arms the timer once now, so that libdispatch makes its timer descriptor at start-up
        // rather than at the first connection that has a deadline.
        timer.schedule(deadline: .now() + .milliseconds(20))
        // Stored before activation: nothing runs on `queue` until then.
        self.source = source
        self.timer = timer
        source.activate()
        timer.activate()
    }

    /// Whether the caller runs on this shard's queue.
    var isCurrent: Bool { DispatchQueue.getSpecific(key: Self.key) == index }

    // MARK: Registrations

    /// Adds `fd` to the set for `events`; its events go to `handler` with `tag`. Returns the
    /// registration id, for `deregister`. The shard holds the handler until then.
    func register(fd: Int32, events: UInt32, handler: any EventHandler, tag: UInt8) throws(SystemError) -> UInt64 {
        let slot: Int
        if let free = freeSlots.popLast() {
            slot = Int(free)
        } else {
            slot = slots.count
            slots.append(Slot())
        }
        slots[slot].generation &+= 1
        slots[slot].tag = tag
        slots[slot].handler = handler
        let id = UInt64(slots[slot].generation) << 32 | UInt64(slot)
        do throws(SystemError) {
            _ = try systemCall("epoll_ctl") { sameport_epoll_ctl(epollFD, sameport_epoll_ctl_add, fd, events, id) }
        } catch {
            release(slot: slot)
            throw error
        }
        return id
    }

    /// Registers a connected socket for everything, edge-triggered, for its whole life.
    func registerSocket(_ socket: Socket, handler: any EventHandler, tag: UInt8) throws(SystemError) -> UInt64 {
        try register(
            fd: socket.fd, events: sameport_epollin | sameport_epollpri | sameport_epollout | sameport_epollrdhup | sameport_epollet,
            handler: handler, tag: tag)
    }

    /// Removes `fd` from the set (sameport_epoll_ctl_del) and forgets its handler: events already fetched
    /// for it are dropped. Call it before closing the descriptor.
    func deregister(fd: Int32, id: UInt64) {
        guard forget(id: id) else { return }
        _ = sameport_epoll_ctl(epollFD, sameport_epoll_ctl_del, fd, 0, 0)
    }

    /// Forgets the registration of a socket that the caller closes right away, without
    /// EPOLL_CTL_DEL: a connection's sockets are never duplicated (no dup, no fork, close-on-exec),
    /// so close(2) takes the descriptor out of the set (epoll(7)), and events already fetched for
    /// it are dropped by the registration id as with `deregister`. One system call fewer per
    /// socket. False when `id` is no (longer a) registration.
    @discardableResult
    func forget(id: UInt64) -> Bool {
        let slot = Int(truncatingIfNeeded: id & 0xFFFF_FFFF)
        guard slot < slots.count, UInt64(slots[slot].generation) == id >> 32, slots[slot].handler != nil else { return false }
        release(slot: slot)
        return true
    }

    private func release(slot: Int) {
        slots[slot].handler = nil
        slots[slot].generation &+= 1
        freeSlots.append(UInt32(slot))
    }

    // MARK: Deadlines

    /// Wakes `handler` at `deadline` (DispatchTime uptime nanoseconds), replacing its earlier one.
    func setDeadline(_ handler: any DeadlineHandler, at deadline: UInt64) {
        heap.set(handler, deadline: deadline)
    }

    /// Forgets `handler`'s deadline, if it has one.
    func cancelDeadline(_ handler: any DeadlineHandler) {
        heap.remove(handler)
    }

    // MARK: Accept spread

    /// Calls `body` on this shard whenever the group's accept spread changes, until `unwatch`.
    func watchAcceptSpread(_ watcher: AnyObject, _ body: @escaping () -> Void) {
        spreadWatchers[ObjectIdentifier(watcher)] = body
    }

    func unwatchAcceptSpread(_ watcher: AnyObject) {
        spreadWatchers[ObjectIdentifier(watcher)] = nil
    }

    fileprivate func acceptSpreadChanged() {
        for body in spreadWatchers.values { body() }
    }

    /// Makes the loop's next epoll_wait a non-blocking look (timeout 0), on this shard, in this
    /// run: a run that ends first forgets it (the next begins with a look from Dispatch, maybe
    /// much later).
    func lookNext() {
        lookAskedFor = true
    }

    // MARK: Work

    /// Runs `task` on this shard: from another thread through the inbox (which wakes the shard),
    /// from the shard itself after the current handler returns.
    func execute(_ task: @escaping @Sendable () -> Void) {
        if isCurrent {
            deferred.append(task)
            return
        }
        inbox.withLock { $0.append(task) }
        wake()
    }

    private func wake() {
        guard !wakePending.exchange(true, ordering: .acquiringAndReleasing) else { return }
        var one: UInt64 = 1
        _ = Glibc.write(wakeFD, &one, 8)
    }

    private func runInbox() {
        var count: UInt64 = 0
        _ = Glibc.read(wakeFD, &count, 8)
        wakePending.store(false, ordering: .releasing)
        let tasks = inbox.withLock { inbox -> [@Sendable () -> Void] in
            defer { inbox.removeAll(keepingCapacity: true) }
            return inbox
        }
        for task in tasks { task() }
    }

    /// Runs the tasks deferred so far, once: a task that defers another (a busy direction that
    /// yields) waits for the next pass, after the shard has looked at its other sockets.
    private func runDeferred() {
        guard !deferred.isEmpty else { return }
        let tasks = deferred
        deferred.removeAll(keepingCapacity: true)
        for task in tasks { task() }
    }

    // MARK: The loop

    /// One run: events and deadlines until `linger` passes with nothing to do (or `maximumRun`).
    ///
    /// The wait for the linger's end runs with a timer slack of `lingerSlack`. A wait with a
    /// timeout arms an hrtimer, and one that expires before every other timer of its CPU (the
    /// next tick included) makes the kernel reprogram the CPU's timer device when the wait starts
    /// and again when an event ends it early: on a virtual machine's lapic-deadline timer, a trap
    /// to the hypervisor each time. With the slack, the timer's latest expiry lies past the next
    /// tick, which then ends the wait: nothing is reprogrammed (nginx's and HAProxy's waits last
    /// until their next timeout, minutes away, for the same effect). Measured pinned to one CPU:
    /// a 64-byte round trip through the relay took 2.5-3 µs less (37.3 to 34.1-35.0 µs). The
    /// quiet window is so 1 ms plus at most one tick; a wait for a deadline sooner than that keeps
    /// the default slack (50 µs), and the thread's slack is reset when the run ends.
    private func run(fromEvent: Bool) {
        let started = Monotonic.now
        var lastBusy: UInt64? = fromEvent ? started : nil
        var timeout: Int64 = 0
        var slackIsLong = false
        var looking = false
        defer { if slackIsLong { _ = sameport_set_timer_slack(0) } }
        while true {
            let count = sameport_epoll_wait(epollFD, events, Self.batch, timeout)
            lastWaitWasLook = looking
            looking = false
            if count > 0 { dispatch(count: Int(count)) }
            runDeferred()
            var now = Monotonic.now
            while let due = heap.popDue(now: now) {
                due.deadlineReached(now: now)
                runDeferred()
                now = Monotonic.now
            }
            if count > 0 || !deferred.isEmpty { lastBusy = now }
            timeout = 0
            guard now &- started < Self.maximumRun else { break }
            if count == Self.batch || !deferred.isEmpty || lookAskedFor {
                looking = lookAskedFor
                lookAskedFor = false
                continue
            }
            guard let busy = lastBusy, linger > 0, now &- busy < linger else { break }
            var wait = linger - (now &- busy)
            var forDeadline = false
            if let next = heap.earliest, next &- now < wait || next <= now {
                wait = next > now ? next - now : 0
                forDeadline = true
            }
            if wait > 0, slackIsLong == forDeadline {
                slackIsLong = !forDeadline
                _ = sameport_set_timer_slack(slackIsLong ? Self.lingerSlack : 0)
            }
            timeout = Int64(wait)
        }
        lookAskedFor = false
        if !deferred.isEmpty {
            // Out of time with work left: through the inbox, whose eventfd brings Dispatch back.
            let tasks = deferred
            deferred.removeAll()
            inbox.withLock { $0.append(contentsOf: tasks) }
            wake()
        }
        armTimer()
    }

    private func dispatch(count: Int) {
        for index in 0..<count {
            let event = events[index]
            if event.data == Self.wakeID {
                runInbox()
                continue
            }
            let slot = Int(truncatingIfNeeded: event.data & 0xFFFF_FFFF)
            guard slot < slots.count, UInt64(slots[slot].generation) == event.data >> 32,
                  let handler = slots[slot].handler else { continue }  // closed since: dropped
            handler.handle(events: event.events, tag: slots[slot].tag)
        }
    }

    private func armTimer() {
        let next = heap.earliest ?? .max
        guard next != armedDeadline else { return }
        guard let timer else { return }
        armedDeadline = next
        if next == .max {
            timer.schedule(deadline: .distantFuture)
        } else {
            timer.schedule(deadline: DispatchTime(uptimeNanoseconds: next), leeway: .microseconds(50))
        }
    }
}

/// The shards of the process: one per CPU it may run on, unless told otherwise.
public final class EventLoopGroup: Sendable {
    let loops: [EventLoop]
    private let next = Atomic<Int>(0)

    private static let configuration = Mutex<(threads: Int?, linger: Duration)>((nil, defaultLinger))
    private static let instance = Mutex<EventLoopGroup?>(nil)

    /// How long a shard waits for more events before it hands its thread back to Dispatch
    /// (measured, see README "How the pump works"). A second serves sporadic connections without
    /// Dispatch's hand-off, but one connection took 1,003 ms with it in a CI run under load, cause
    /// not yet found: 1 ms until it is.
    public static let defaultLinger = Duration.milliseconds(1)

    /// Sets the number of shards (nil: one per CPU the process may run on) and the linger, before
    /// the first relay starts; later calls change nothing once the group exists.
    public static func configure(threads: Int?, linger: Duration = defaultLinger) {
        configuration.withLock { $0 = (threads, linger) }
    }

    /// The CPUs this process may run on (sched_getaffinity), at least 1.
    public static var availableCPUs: Int { max(1, Int(sameport_cpu_count())) }

    /// The process's group, created at first use.
    public static func shared() throws(SystemError) -> EventLoopGroup {
        let (threads, linger) = configuration.withLock { $0 }
        return try instance.withLock { instance throws(SystemError) -> EventLoopGroup in
            if let instance { return instance }
            let group = try EventLoopGroup(threads: threads ?? availableCPUs, linger: linger)
            instance = group
            return group
        }
    }

    init(threads: Int, linger: Duration) throws(SystemError) {
        var loops: [EventLoop] = []
        for index in 0..<max(1, threads) {
            loops.append(try EventLoop(index: index, linger: linger))
        }
        self.loops = loops
    }

    /// A group of these loops (tests).
    init(loops: [EventLoop]) {
        self.loops = loops
    }

    private let started = Atomic<Bool>(false)

    /// Starts every shard's Dispatch source and timer (once; later calls do nothing).
    public func start() {
        guard !started.exchange(true, ordering: .acquiringAndReleasing) else { return }
        for loop in loops { loop.activate() }
    }

    /// The number of shards.
    public var count: Int { loops.count }

    /// Whether every shard takes new clients, or only the first. A connection lives on the shard
    /// that accepted it, and a client handed to a shard that sleeps in Dispatch costs a thread
    /// wake-up, while one taken by the shard already running costs none: so the first shard
    /// accepts alone while it keeps up (every accept finds one client waiting), and the others
    /// join once clients queue up behind it (see `Acceptor`). Without this, a listener in every
    /// shard's epoll set wakes every shard that sleeps in Dispatch for each client
    /// (EPOLLEXCLUSIVE only wakes one of the waiters *in* epoll_wait).
    let acceptSpread = Atomic<Bool>(false)

    /// Switches the spread; tells the shards after the first (whose acceptors follow it).
    func setAcceptSpread(_ spread: Bool) {
        guard acceptSpread.exchange(spread, ordering: .acquiringAndReleasing) != spread else { return }
        for loop in loops.dropFirst() {
            loop.execute { loop.acceptSpreadChanged() }
        }
    }

    /// A shard, round robin.
    func nextLoop() -> EventLoop {
        loops[next.add(1, ordering: .relaxed).oldValue % loops.count]
    }

    /// Runs `body` after a task has passed through every shard's loop in turn: a stuck shard
    /// never lets it through (the watchdog's proof of life).
    public func hopThroughEveryShard(then body: @escaping @Sendable () -> Void) {
        Self.hop(loops[...], then: body)
    }

    private static func hop(_ loops: ArraySlice<EventLoop>, then body: @escaping @Sendable () -> Void) {
        guard let first = loops.first else { return body() }
        let rest = loops.dropFirst()
        first.execute { hop(rest, then: body) }
    }
}

/// A binary min-heap of deadline handlers, each at most once, removable by its stored index.
struct DeadlineHeap {
    private var entries: [any DeadlineHandler] = []

    var earliest: UInt64? { entries.first?.deadline }
    var count: Int { entries.count }

    /// Adds `handler` at `deadline`, or moves it there.
    mutating func set(_ handler: any DeadlineHandler, deadline: UInt64) {
        let index = handler.deadlineIndex
        if index >= 0, index < entries.count, entries[index] === handler {
            let earlier = deadline < handler.deadline
            handler.deadline = deadline
            if earlier { siftUp(index) } else { siftDown(index) }
            return
        }
        handler.deadline = deadline
        handler.deadlineIndex = entries.count
        entries.append(handler)
        siftUp(entries.count - 1)
    }

    mutating func remove(_ handler: any DeadlineHandler) {
        let index = handler.deadlineIndex
        guard index >= 0, index < entries.count, entries[index] === handler else { return }
        handler.deadlineIndex = -1
        let last = entries.removeLast()
        guard index < entries.count else { return }
        entries[index] = last
        last.deadlineIndex = index
        siftUp(index)
        siftDown(last.deadlineIndex)
    }

    /// Removes and returns a handler whose deadline is at or before `now`, earliest first.
    mutating func popDue(now: UInt64) -> (any DeadlineHandler)? {
        guard let first = entries.first, first.deadline <= now else { return nil }
        remove(first)
        return first
    }

    private mutating func siftUp(_ start: Int) {
        var index = start
        while index > 0 {
            let parent = (index - 1) / 2
            guard entries[index].deadline < entries[parent].deadline else { break }
            swapAt(index, parent)
            index = parent
        }
    }

    private mutating func siftDown(_ start: Int) {
        var index = start
        while true {
            let left = 2 * index + 1
            guard left < entries.count else { break }
            let right = left + 1
            var child = left
            if right < entries.count, entries[right].deadline < entries[left].deadline { child = right }
            guard entries[child].deadline < entries[index].deadline else { break }
            swapAt(index, child)
            index = child
        }
    }

    private mutating func swapAt(_ a: Int, _ b: Int) {
        entries.swapAt(a, b)
        entries[a].deadlineIndex = a
        entries[b].deadlineIndex = b
    }
}

extension Duration {
    /// The duration in whole nanoseconds (saturating).
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        let (whole, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        guard !overflow else { return seconds < 0 ? .min : .max }
        return whole.addingReportingOverflow(attoseconds / 1_000_000_000).partialValue
    }
}
