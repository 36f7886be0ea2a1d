import CSamePortBuildInfo

/// sameport's version: the one place its number is written.
///
/// `sameport --version` prints `description`; the Debian package's version is checked against
/// `number` (packaging/debian/rules refuses to build a package whose changelog says otherwise,
/// and EndToEndTests' PackagingTests compare the changelog's newest entry with it).
enum Version {
    /// The release number, `MAJOR.MINOR.PATCH`.
    static let number = "0.1.0"

    /// The commit the binary was built from, or nil when the build had none (SAMEPORT_GIT_COMMIT,
    /// which scripts/setup.sh and scripts/package.sh set from the checkout).
    static let commit: String? = {
        let commit = String(cString: sameport_git_commit())
        return commit.isEmpty ? nil : commit
    }()

    /// `0.1.0`, or `0.1.0 (git 430ec53a1b2c)` when built from a checkout.
    static let description = commit.map { "\(number) (git \($0))" } ?? number
}
