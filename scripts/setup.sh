#!/usr/bin/env bash
# Installs what sameport's build, tests and demo need, then builds it.
# Safe to run again: packages already present are not reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd-container: systemd-nspawn, for scripts/systemd-container-test.sh (SystemdContainerTests).
# python3: that test's upstream and clients (and scripts/bench.py).
# man-db, bash-completion: what the Debian package's install test asks of the container (man -w,
# completing `sameport --eg`); scripts/package.sh installs the package build's own tools.
# nftables, iproute2: the transparent forwarding tests' REDIRECT and TPROXY rules and the network
# namespaces they run in (Tests/SamePortTestSupport/RoutedTopology.swift); the vanished-peer tests
# and soak round, which drop a peer's packets inside a namespace.
packages=(libsystemd-dev socat iproute2 nftables util-linux procps systemd-container python3 man-db bash-completion)
missing=()
for package in "${packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

export PATH="/opt/swift/usr/bin:$PATH"
command -v swift >/dev/null || { echo "setup: swift not found (expected at /opt/swift/usr/bin)" >&2; exit 1; }
# The checkout's commit, for `sameport --version` (Package.swift reads it).
SAMEPORT_GIT_COMMIT=$(./scripts/git-commit.sh)
export SAMEPORT_GIT_COMMIT
swift build "$@"
