#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (unit, socket and end-to-end tests), then the
# end-to-end tests a second time on the read/write path. The end-to-end tests' relays splice from
# the first byte (--splice-after 0); with SAMEPORT_TEST_SPLICE=off they run with --splice off
# (see Tests/SamePortTestSupport/RelayProcess.swift; the Splice suite sets its own flags).
# The end-to-end tests use loopback only, or network namespaces they create and remove; a few need
# root (run as nobody via setpriv, a private mount namespace via unshare, network namespaces with
# nftables rules for transparent forwarding) and are written for CI, which runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --build-tests
export PATH="/opt/swift/usr/bin:$PATH"
# Serial: the transfer and churn tests measure memory and descriptors of one relay at a time.
swift test --skip-build --no-parallel
SAMEPORT_TEST_SPLICE=off swift test --skip-build --no-parallel --filter EndToEndTests
