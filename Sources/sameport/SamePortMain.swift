import ArgumentParser
import Glibc
import SamePortSystemd

/// The process entry: parses the command line and maps every failure to its exit code.
///
/// Exit codes: 0 clean stop (and --help, --version); 1 runtime failure; 2 usage or configuration
/// error, including a start-up refusal (address in use, permission denied, unresolvable upstream).
/// ArgumentParser's own usage exit code (64) is replaced by 2, and its error is printed as one line.
enum SamePortMain {
    static func main() {
        let command: ParsableCommand
        do {
            command = try SamePortCommand.parseAsRoot()
        } catch {
            exitForParseError(error)
        }
        do {
            var command = command
            try command.run()
            exit(ExitCode.success.rawValue)
        } catch let error as StartFailure {
            for line in error.details { printLine(line) }
            for message in error.messages { printError(message) }
            exit(error.exitCode)
        } catch {
            exitForParseError(error)
        }
    }

    private static func exitForParseError(_ error: Error) -> Never {
        let code = SamePortCommand.exitCode(for: error)
        if code == .success {
            // --help and --version are "errors" that carry the text to print. `run` is the default
            // subcommand, so the root's help goes on with run's options, as a man page would.
            print(SamePortCommand.fullMessage(for: error))
            if ["--help", "-h", "help"].contains(CommandLine.arguments.dropFirst().first ?? ""),
               CommandLine.arguments.count == 2 {
                print("\n" + SamePortCommand.helpMessage(for: RunCommand.self))
            }
            exit(0)
        }
        let message = SamePortCommand.message(for: error)
            .split(separator: "\n").first.map(String.init) ?? "invalid command line"
        printError("usage error: \(message) (see 'sameport --help')")
        exit(2)
    }

    static func printError(_ message: String) {
        printLine("sameport: \(message)")
    }

    /// One line to stderr, in one write(2); under journald with the error priority (`<3>`), so
    /// that `journalctl -p err` shows why the service did not start.
    static func printLine(_ text: String) {
        var line = (Journal.isStderrJournal ? "<3>" : "") + text + "\n"
        line.withUTF8 { buffer in
            _ = write(2, buffer.baseAddress, buffer.count)
        }
    }
}

/// A failure that ends the process with one line per cause and an exit code.
struct StartFailure: Error {
    var messages: [String]
    var exitCode: Int32
    /// Lines printed as they are before the messages: `FILE:LINE:COLUMN: problem`.
    var details: [String] = []
    /// The errno behind the first failure, for systemd's ERRNO=; nil when there is none.
    var errno: Int32?

    init(messages: [String], exitCode: Int32, details: [String] = [], errno: Int32? = nil) {
        self.messages = messages
        self.exitCode = exitCode
        self.details = details
        self.errno = errno
    }

    init(message: String, exitCode: Int32) {
        self.init(messages: [message], exitCode: exitCode)
    }
}

/// `sameport`: the root command.
struct SamePortCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sameport",
        abstract: "A TCP relay that dials every upstream from the ip:port it listens on.",
        discussion: """
            sameport accepts clients on ip:P and opens each upstream connection from a socket bound \
            to that same ip:P, so the upstream, and every firewall and NAT between, sees the relay's \
            traffic leave from the port it listens on.

            With the source pinned to ip:P, only one connection at a time can exist to a given \
            upstream ip:port (a TCP connection is the 4-tuple of both ends). sameport books the pairs \
            it has in use, spreads clients over the upstreams you give, and decides with --on-busy \
            what happens when every upstream is taken.

            EXIT STATUS
              0  stopped cleanly (SIGTERM, after draining, or SIGINT)
              1  runtime failure after start-up
              2  usage or configuration error, or a start-up refusal (address in use, permission denied)
            """,
        version: Version.description,
        subcommands: [RunCommand.self, CheckCommand.self],
        defaultSubcommand: RunCommand.self
    )
}
