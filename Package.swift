// swift-tools-version: 6.0
import PackageDescription

/// The commit `sameport --version` names: SAMEPORT_GIT_COMMIT, which scripts/setup.sh and
/// scripts/package.sh set from the checkout (scripts/git-commit.sh); none when it is unset.
let gitCommit = Context.environment["SAMEPORT_GIT_COMMIT"].flatMap { $0.isEmpty ? nil : $0 }

let package = Package(
    name: "sameport",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "sameport", targets: ["sameport"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/LebJe/TOMLKit", exact: "0.6.0"),
    ],
    targets: [
        // What Glibc hides from Swift (splice, pipe2, accept4, ...), compiled with _GNU_SOURCE.
        .target(
            name: "CSamePortShims",
            cSettings: [.define("_GNU_SOURCE")]
        ),
        // The commit the binary was built from, for --version (a C string defined from above).
        .target(
            name: "CSamePortBuildInfo",
            cSettings: gitCommit.map { [.define("SAMEPORT_GIT_COMMIT", to: "\"\($0)\"")] } ?? []
        ),
        // libsystemd's sd-daemon API (libsystemd-dev).
        .systemLibrary(name: "CSystemd", pkgConfig: "libsystemd", providers: [.apt(["libsystemd-dev"])]),
        // systemd integration: socket activation, sd_notify, watchdog, capabilities, journald.
        .target(name: "SamePortSystemd", dependencies: ["CSystemd", "CSamePortShims"]),
        // Pure Swift: endpoints, options, policies, bookkeeping. No syscalls.
        .target(name: "SamePortCore"),
        // What TOMLKit cannot do: free a document it parsed. C++ against TOMLKit's own toml++,
        // configured as TOMLKit builds it (TOML_EXCEPTIONS=1).
        .target(
            name: "CSamePortTOML",
            dependencies: [.product(name: "TOMLKit", package: "TOMLKit")],
            cxxSettings: [.define("TOML_EXCEPTIONS", to: "1")]
        ),
        // The configuration file: TOML read with TOMLKit, validated into RelaySpecs, every
        // problem reported as FILE:LINE:COLUMN.
        .target(
            name: "SamePortConfig",
            dependencies: ["SamePortCore", "CSamePortTOML", .product(name: "TOMLKit", package: "TOMLKit")]
        ),
        // The only module that talks to the kernel: sockets, listener, dialer, pump, relay.
        .target(
            name: "SamePortNet",
            dependencies: [
                "SamePortCore",
                "CSamePortShims",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "sameport",
            dependencies: [
                "CSamePortBuildInfo",  // the git commit of --version
                "CSamePortShims",  // sameport_signal_pipe: signals, which the executable owns
                "SamePortCore",
                "SamePortConfig",
                "SamePortNet",
                "SamePortSystemd",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Loopback peers, process control and deadlines shared by the test targets.
        .target(
            name: "SamePortTestSupport",
            dependencies: ["SamePortCore"],
            path: "Tests/SamePortTestSupport"
        ),
        .testTarget(name: "SamePortCoreTests", dependencies: ["SamePortCore"]),
        .testTarget(name: "SamePortConfigTests", dependencies: ["SamePortConfig", "SamePortCore"]),
        .testTarget(
            name: "SamePortNetTests",
            dependencies: ["SamePortNet", "SamePortCore", "SamePortTestSupport", "CSamePortShims"]
        ),
        .testTarget(
            name: "EndToEndTests",
            dependencies: ["sameport", "SamePortCore", "SamePortConfig", "SamePortTestSupport"]
        ),
    ],
    swiftLanguageModes: [.v6],
    // toml++ 3 (in CSamePortTOML) needs C++17, as in TOMLKit's own package.
    cxxLanguageStandard: .cxx17
)
