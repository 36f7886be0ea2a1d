import CSamePortShims

/// The shards' clock: CLOCK_MONOTONIC in nanoseconds, the clock behind Dispatch's uptime on Linux
/// (`DispatchTime.now().uptimeNanoseconds`), so a deadline read from it arms a shard's Dispatch
/// timer as `DispatchTime(uptimeNanoseconds:)`. Read directly: a connection takes several stamps,
/// and Dispatch's layers cost more than the clock.
enum Monotonic {
    static var now: UInt64 { sameport_monotonic_ns() }
}
