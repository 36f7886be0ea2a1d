import Foundation
import Glibc
import SamePortTestSupport
import Testing

/// scripts/soak.py --ci with the built binary: 50,000 connections churned through fixed-port relays
/// (16 upstreams, 8 clients, a fresh relay each round, the first under a 1,024-descriptor limit),
/// 20,000 through --egress ephemeral, a SIGHUP every 10 ms during checksummed transfers, and a
/// client and an upstream that vanish (nftables, in a namespace) and must give their pairs back.
/// Any crash, failed connection, connection of 100 ms or more, or descriptor left behind fails it.
@Suite("Soak", .serialized,
       .disabled(if: RelayProcess.spliceOff, "the churn moves one byte a connection: once is enough"))
struct SoakTests {
    /// The package root, from this file's path: Tests/EndToEndTests/<this file>.
    private static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    @Test("soak.py --ci: no crash, no failed connection, no stall of 100 ms, descriptors back to baseline",
          .timeLimit(.minutes(5)))
    func soak() throws {
        let script = Self.packageRoot.appendingPathComponent("scripts/soak.py").path
        let run = try RelayProcess(["python3", script, "--ci", "--bin", RelayProcess.binary], executable: "/usr/bin/env")
        let status = run.waitForExit(timeout: .seconds(240))
        if status == nil { run.stop(signal: SIGTERM, timeout: .seconds(10)) }
        let output = run.output
        print(output)
        let lines = output.split(separator: "\n").map(String.init)
        #expect(status == 0, "soak.py exited \(String(describing: status)): \(lines.filter { $0.hasPrefix("FAIL") })")
        #expect(lines.filter { $0.hasPrefix("FAIL: ") }.isEmpty, "\(lines.filter { $0.hasPrefix("FAIL") })")
        let summary = try #require(lines.last { $0.hasSuffix(" failed") }, "no summary line")
        #expect(summary.hasSuffix(" passed, 0 failed"), "\(summary)")
        #expect(lines.contains { $0.hasPrefix("PASS: same-port: ") && $0.contains("connections served") })
        #expect(lines.contains { $0.hasPrefix("PASS: vanished: every pair came back") }, "the vanished-peer round did not run")
    }
}
