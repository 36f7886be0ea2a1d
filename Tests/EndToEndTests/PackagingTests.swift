import Foundation
import Glibc
import SamePortConfig
import SamePortTestSupport
import Testing

/// What the Debian package ships, checked against the code it describes, without building it:
/// one version, a manual page with every configuration key, a default configuration that
/// matches the packaged socket. (SystemdContainerTests builds and installs the package.)
@Suite("Packaging")
struct PackagingTests {
    /// The package root, from this file's path: Tests/EndToEndTests/<this file>.
    private static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    private func read(_ path: String) throws -> String {
        try String(contentsOf: Self.packageRoot.appendingPathComponent(path), encoding: .utf8)
    }

    /// Runs sameport to completion; its exit status and output.
    private func sameport(_ arguments: [String]) throws -> (status: Int32?, output: String) {
        let process = try RelayProcess(arguments)
        let status = process.waitForExit(timeout: .seconds(20))
        if status == nil { process.stop(signal: SIGKILL) }
        return (status, process.output)
    }

    @Test("The Debian changelog's newest version is the one sameport --version prints")
    func oneVersion() throws {
        let changelog = try read("packaging/debian/changelog")
        let first = try #require(changelog.split(separator: "\n").first.map(String.init))
        let match = try #require(first.firstMatch(of: #/^sameport \((?:\d+:)?([^)\s-]+)(?:-[^)\s]+)?\) /#), "\(first)")
        let (status, version) = try sameport(["--version"])
        #expect(status == 0)
        #expect(version.split(separator: " ").first.map(String.init)?.trimmingCharacters(in: .whitespacesAndNewlines) == String(match.1),
                "sameport --version says '\(version)', packaging/debian/changelog \(match.1): change Sources/sameport/Version.swift and the changelog together")
    }

    @Test("sameport.toml(5) describes every key a relay may have, and its example passes sameport check")
    func configurationManualPage() throws {
        let page = try read("packaging/man/sameport.toml.5")
        for key in RelayKey.allCases {
            #expect(page.contains("\n.BR \(key.rawValue) "), "sameport.toml.5 has no '.BR \(key.rawValue) ' item under KEYS")
        }
        let example = try #require(page.firstMatch(of: #/\.SH EXAMPLE\n(?:.*\n)*?\.EX\n((?:.*\n)*?)\.EE\n/#), "no .EX/.EE block under EXAMPLE")
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("sameport-manual-example-\(getpid()).toml")
        try String(example.1).write(to: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: file) }
        let (status, output) = try sameport(["check", "--config", file.path])
        #expect(status == 0, "the manual's example fails sameport check: \(output)")
    }

    @Test("The default /etc/sameport/sameport.toml passes check, listens on loopback only, and is the relay sameport.socket passes")
    func defaultConfiguration() throws {
        let (status, output) = try sameport(["check", "--config", Self.packageRoot.appendingPathComponent("packaging/debian/sameport.toml").path])
        #expect(status == 0, "\(output)")
        let socket = try read("packaging/systemd/sameport.socket")
        let listen = try #require(socket.firstMatch(of: #/\nListenStream=(\S+)\n/#)?.1)
        let name = try #require(socket.firstMatch(of: #/\nFileDescriptorName=(\S+)\n/#)?.1)
        let rows = output.split(separator: "\n").dropFirst().filter { !$0.contains("configuration OK") }
        #expect(rows.count == 1, "one relay: \(output)")
        let columns = rows.first?.split(separator: " ").map(String.init) ?? []
        #expect(columns.first == String(name) && columns.dropFirst().first == String(listen),
                "the relay '\(name)' on \(listen), as sameport.socket passes it; saw \(rows)")
        #expect(listen.hasPrefix("127.") && output.contains("allow 127.0.0.0/8"), "loopback only: \(output)")
    }
}
