import Foundation
import Glibc
import SamePortTestSupport
import Testing

/// packaging/systemd under a real systemd: scripts/systemd-container-test.sh boots systemd 252 in a
/// systemd-nspawn container (the host's root with a tmpfs overlay, a private network) with the
/// built binary as /usr/local/bin/sameport, and checks the units end to end: the hardening,
/// socket activation, readiness, watchdog, reload, drain on stop, journal priorities and the
/// template pair. The script prints one PASS line per check; its output is printed here.
///
/// Needs root (CI runs as root). systemd-nspawn missing is a failure, not a skip:
/// scripts/setup.sh installs systemd-container.
@Suite("systemd container", .serialized,
       .disabled(if: RelayProcess.spliceOff, "runs the configuration's own splice setting: once is enough"))
struct SystemdContainerTests {
    /// The package root, from this file's path: Tests/EndToEndTests/<this file>.
    private static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    @Test("The systemd units work under a real systemd 252 in a container",
          .enabled(if: getuid() == 0, "needs root: systemd-nspawn, mount and nsenter"),
          .timeLimit(.minutes(5)))
    func unitsUnderSystemd() throws {
        let script = Self.packageRoot.appendingPathComponent("scripts/systemd-container-test.sh").path
        #expect(FileManager.default.isExecutableFile(atPath: script), "\(script)")
        let run = try RelayProcess([script, RelayProcess.binary], executable: "/usr/bin/env")
        let status = run.waitForExit(timeout: .seconds(240))
        if status == nil {
            // SIGTERM: the script's trap powers the container off and cleans up.
            run.stop(signal: SIGTERM, timeout: .seconds(60))
        }
        let output = run.output
        print(output)
        try #require(status != nil, "systemd-container-test.sh did not finish within 240 s")
        try #require(status != 77, "systemd-container-test.sh skipped itself (systemd-nspawn missing? run scripts/setup.sh): \(output.suffix(300))")
        let lines = output.split(separator: "\n").map(String.init)
        #expect(status == 0, "systemd-container-test.sh exited \(status ?? -1)")
        // On failure the script's last line is its first FAIL line, repeated after the diagnostics.
        let last = lines.last ?? ""
        let passes = lines.filter { $0.hasPrefix("PASS: ") }.count
        #expect(last == "systemd-container-test: all \(passes) checks passed", "last line: \(last)")
        #expect(passes >= 30, "\(passes) PASS lines")
    }
}
