import Foundation
import Glibc
import SamePortTestSupport
import Testing

/// scripts/bench.py is a benchmark, not a test; this only proves that it still runs end to end
/// (with the debug binary, tiny sizes, no installing) and prints a table with believable numbers.
@Suite("Bench smoke", .serialized)
struct BenchSmokeTests {
    /// The package root, from this file's path: Tests/EndToEndTests/<this file>.
    private static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The cells of the table row whose first cell is `label`, without that label.
    private static func row(_ label: String, in output: String) -> [String]? {
        for line in output.split(separator: "\n") where line.hasPrefix("| \(label) |") {
            let cells = line.split(separator: "|").map { $0.trimmingCharacters(in: .whitespaces) }
            return Array(cells.dropFirst())
        }
        return nil
    }

    /// The numbers in a cell, in order: "0.45x (12.9 Gbit/s)" gives [0.45, 12.9]; "+31.7 µs (45.0)"
    /// gives [31.7, 45.0]; "n/a" and "—" give [].
    private static func numbers(_ cell: String) -> [Double] {
        var found: [Double] = []
        var current = ""
        for character in cell + " " {
            if character.isNumber || character == "." || (character == "-" && current.isEmpty) || character == "," {
                if character != "," { current.append(character) }
            } else {
                if let value = Double(current) { found.append(value) }
                current = ""
            }
        }
        return found
    }

    @Test("bench.py --smoke runs and prints direct and sameport rows with plausible numbers")
    func smoke() throws {
        let script = Self.packageRoot.appendingPathComponent("scripts/bench.py").path
        #expect(FileManager.default.fileExists(atPath: script), "\(script)")
        let bench = try RelayProcess(["python3", script, "--smoke", "--no-install", "--bin", RelayProcess.binary],
                                     executable: "/usr/bin/env")
        let status = bench.waitForExit(timeout: .seconds(240))
        if status == nil { bench.stop(signal: SIGTERM, timeout: .seconds(10)) }
        let output = bench.output
        print(output)
        try #require(status == 0, "bench.py did not exit 0 within 240 s (status \(String(describing: status)))")

        let header = try #require(Self.row("configuration", in: output), "no table header")
        let column = { (name: String) throws -> Int in
            try #require(header.firstIndex(of: name), "no column '\(name)' in \(header)")
        }
        let bulkUp = try column("bulk up"), bulkDown = try column("bulk down"), cpu = try column("CPU s/GiB")
        let p50 = try column("ping-pong p50"), conn1 = try column("conn/s c=1"), idle = try column("KiB/idle conn")
        let conn8 = try column("conn/s c=8"), reconnect = try column("conn/s 1 upstream")
        let sporadic = try column("sporadic conn p50"), connectionCPU = try column("CPU µs/conn c=8")

        let direct = try #require(Self.row("direct (no relay)", in: output), "no direct row")
        // Direct: ratio 1.00 and an absolute figure: over 0.1 Gbit/s, 1 to 10,000 µs, over 100 connections/s.
        for index in [bulkUp, bulkDown] {
            let values = Self.numbers(direct[index])
            #expect(values.count == 2 && values[0] == 1 && values[1] > 0.1, "direct \(header[index]): \(direct[index])")
        }
        let directLatency = Self.numbers(direct[p50])
        #expect(directLatency.count == 1 && directLatency[0] > 1 && directLatency[0] < 10_000, "direct p50: \(direct[p50])")
        let directRate = Self.numbers(direct[conn1])
        #expect(directRate.count == 2 && directRate[1] > 100, "direct conn/s: \(direct[conn1])")

        // bench.py exits 1 (above) when a sameport connection failed or took 100 ms or more.
        #expect(!output.contains("FAILED:"), "\(output.split(separator: "\n").filter { $0.hasPrefix("FAILED:") })")
        for label in ["sameport (same-port egress)", "sameport --egress ephemeral", "sameport --threads 1"] {
            let row = try #require(Self.row(label, in: output), "no row '\(label)'")
            for index in [bulkUp, bulkDown] {
                let values = Self.numbers(row[index])
                #expect(values.count == 2 && values[0] > 0.001 && values[0] < 10 && values[1] > 0,
                        "\(label) \(header[index]): \(row[index])")
            }
            // A rate and its ratio: connections went through in each conn/s run.
            for index in [conn1, conn8, reconnect] {
                let rate = Self.numbers(row[index])
                #expect(rate.count == 2 && rate[0] > 0 && rate[1] > 10, "\(label) \(header[index]): \(row[index])")
            }
            // The relay's own CPU per connection in the c=8 window: a few to a few thousand µs.
            let perConnection = Self.numbers(row[connectionCPU])
            #expect(perConnection.count == 1 && perConnection[0] > 0 && perConnection[0] < 100_000,
                    "\(label) CPU per connection: \(row[connectionCPU])")
            let cpuPerGiB = Self.numbers(row[cpu])
            #expect(cpuPerGiB.count == 1 && cpuPerGiB[0] > 0 && cpuPerGiB[0] < 100, "\(label) CPU: \(row[cpu])")
            let latency = Self.numbers(row[p50])
            #expect(latency.count == 2 && latency[1] > 1 && latency[1] < 100_000, "\(label) p50: \(row[p50])")
            let connection = Self.numbers(row[sporadic])
            #expect(connection.count == 2 && connection[1] > 1 && connection[1] < 100_000, "\(label) sporadic: \(row[sporadic])")
            let memory = Self.numbers(row[idle])
            #expect(memory.count == 1 && abs(memory[0]) < 1024, "\(label) KiB per idle connection: \(row[idle])")
        }
        // With a peer in the run, sameport against the best peer of each repetition: a ratio per
        // conn/s figure and µs for the sporadic connections, named after the peer that was best.
        if ["HAProxy (mode tcp)", "nginx stream", "socat", "systemd-socket-proxyd"].contains(where: { Self.row($0, in: output) != nil }) {
            #expect(output.contains("sameport against the best peer of each repetition"))
            for figure in ["conn/s c=1", "conn/s c=8", "CPU per connection c=8", "conn/s 1 upstream", "sporadic connection p50"] {
                let line = output.split(separator: "\n").first { $0.hasPrefix("- \(figure): ") }
                let values = line.map { Self.numbers(String($0.dropFirst(figure.count + 4))) } ?? []
                let isRatio = figure.hasPrefix("conn/s") || figure.hasPrefix("CPU")
                #expect(values.count >= 2 && (values[0] > 0 || !isRatio) && line?.contains("best peer mostly") == true,
                        "\(figure) against the best peer: \(String(describing: line))")
            }
        }
    }
}
