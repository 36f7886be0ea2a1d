#!/usr/bin/env bash
# Prints the commit of the checkout this script is in, for `sameport --version`: the abbreviated
# hash, with "-dirty" when tracked files have uncommitted changes; nothing outside a checkout.
# scripts/setup.sh and scripts/package.sh export it as SAMEPORT_GIT_COMMIT, which Package.swift
# reads. (Not PackageDescription's Context.gitInformation: SwiftPM caches the manifest's result
# and would go on printing the commit of the build before.)
set -euo pipefail
cd "$(dirname "$0")/.."
git rev-parse --is-inside-work-tree >/dev/null 2>&1 || exit 0
commit=$(git rev-parse --short=12 HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit-dirty"
echo "$commit"
