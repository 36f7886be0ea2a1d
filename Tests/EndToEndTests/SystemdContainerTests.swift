import Foundation
import Glibc
import SamePortTestSupport
import Testing

/// packaging/systemd under a real systemd: scripts/systemd-container-test.sh boots systemd 252 in a
/// systemd-nspawn container (the host's root with a tmpfs overlay, a private network) with the
/// built binary as /usr/local/bin/sameport, and checks the units end to end: the hardening,
/// socket activation, readiness, watchdog, reload, drain on stop, journal priorities and the
/// template pair. The script prints one PASS line per check; its output is printed here. With
/// `--deb`, the same container installs the Debian package instead (debianPackage).
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
        try runContainerTest([RelayProcess.binary], minimumPasses: 30)
    }

    /// scripts/package.sh builds the .deb (a static release build, the manual pages, the
    /// completions; dpkg-buildpackage -b; lintian with no error and no warning), then the
    /// container installs it with /opt hidden and takes it through enable, upgrade, remove and
    /// purge (scripts/systemd-container-deb-checks.sh).
    @Test("The Debian package builds lintian-clean, installs without a Swift toolchain, upgrades without a restart, removes and purges",
          .enabled(if: getuid() == 0, "needs root: apt-get (build dependencies), systemd-nspawn"),
          .timeLimit(.minutes(25)))
    func debianPackage() throws {
        let script = Self.packageRoot.appendingPathComponent("scripts/package.sh").path
        let build = try RelayProcess([script], executable: "/usr/bin/env")
        let status = build.waitForExit(timeout: .seconds(1200))
        if status == nil {
            build.stop(signal: SIGTERM, timeout: .seconds(30))
        }
        let lines = build.output.split(separator: "\n").map(String.init)
        // What a reader of the CI log wants: the script's own steps and lintian's verdict.
        print(lines.filter { $0.hasPrefix("package:") || $0.hasPrefix("E: ") || $0.hasPrefix("W: ") }.joined(separator: "\n"))
        try #require(status == 0, "scripts/package.sh exited \(status ?? -1): \(lines.suffix(40).joined(separator: "\n"))")
        let deb = try #require(lines.last, "no output from scripts/package.sh")
        try #require(deb.hasSuffix(".deb") && FileManager.default.fileExists(atPath: deb), "the last line names the .deb: \(deb)")
        #expect(!lines.contains { $0.hasPrefix("E: ") || $0.hasPrefix("W: ") }, "lintian errors or warnings")
        try runContainerTest(["--deb", deb], minimumPasses: 14)
    }

    /// Runs scripts/systemd-container-test.sh with `arguments`, prints its output, and expects
    /// exit 0 with a last line that counts every PASS line.
    private func runContainerTest(_ arguments: [String], minimumPasses: Int) throws {
        let script = Self.packageRoot.appendingPathComponent("scripts/systemd-container-test.sh").path
        #expect(FileManager.default.isExecutableFile(atPath: script), "\(script)")
        let run = try RelayProcess([script] + arguments, executable: "/usr/bin/env")
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
        #expect(passes >= minimumPasses, "\(passes) PASS lines")
    }
}
