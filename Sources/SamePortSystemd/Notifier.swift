import CSystemd
import Glibc

/// The service manager's notification socket (sd_notify(3)): readiness, status, reload, stop,
/// watchdog. Without NOTIFY_SOCKET (not started by systemd as Type=notify) every call does nothing.
public struct Notifier: Sendable {
    /// True when NOTIFY_SOCKET is set: systemd waits for READY=1.
    public let isEnabled: Bool

    public init() {
        isEnabled = getenv("NOTIFY_SOCKET") != nil
    }

    /// Sends newline-separated `KEY=value` assignments in one datagram. Failures are ignored, as
    /// sd_notify(3) advises: a manager that went away is not the relay's problem.
    public func send(_ assignments: String...) {
        send(assignments)
    }

    private func send(_ assignments: [String]) {
        guard isEnabled else { return }
        _ = sd_notify(0, assignments.joined(separator: "\n"))
    }

    /// READY=1, with a status line when one is given.
    public func ready(status: String?) {
        send(["READY=1"] + Self.statusAssignment(status))
    }

    public func status(_ text: String) {
        send(Self.statusAssignment(text))
    }

    /// RELOADING=1 with the CLOCK_MONOTONIC time in microseconds, which systemd 253+ checks.
    public func reloading() {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let microseconds = UInt64(now.tv_sec) * 1_000_000 + UInt64(now.tv_nsec) / 1_000
        send("RELOADING=1", "MONOTONIC_USEC=\(microseconds)")
    }

    /// STOPPING=1, with a status line when one is given.
    public func stopping(status: String?) {
        send(["STOPPING=1"] + Self.statusAssignment(status))
    }

    public func watchdog() {
        send("WATCHDOG=1")
    }

    /// A fatal start-up error: the errno systemd records for the unit, and the message as status.
    public func failed(errno: Int32, status: String) {
        send(Self.statusAssignment(status) + ["ERRNO=\(errno)"])
    }

    /// `STATUS=text` on one line (a newline would start a new assignment), or nothing.
    private static func statusAssignment(_ text: String?) -> [String] {
        text.map { ["STATUS=" + String($0.map { $0 == "\n" || $0 == "\r" ? " " : $0 })] } ?? []
    }

    /// The watchdog interval systemd asked for (WatchdogSec=, WATCHDOG_USEC for this PID), or nil.
    public static func watchdogInterval() -> Duration? {
        var microseconds: UInt64 = 0
        guard sd_watchdog_enabled(0, &microseconds) > 0, microseconds > 0 else { return nil }
        return .microseconds(Int64(clamping: microseconds))
    }
}
