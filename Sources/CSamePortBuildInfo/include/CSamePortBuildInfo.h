// What the build knew about its source: the git commit it was built from, if any.
//
// Package.swift defines SAMEPORT_GIT_COMMIT for this target alone (from SAMEPORT_GIT_COMMIT in
// the environment, which scripts/setup.sh and scripts/package.sh set), so that a new commit
// recompiles one C file and relinks, instead of changing the flags of every Swift module.
#ifndef SAMEPORT_BUILD_INFO_H
#define SAMEPORT_BUILD_INFO_H

/// The commit the binary was built from (an abbreviated hash, "-dirty" with uncommitted
/// changes), or "" when the build was given none (a plain `swift build`, a source tarball).
const char *sameport_git_commit(void);

#endif
