#!/usr/bin/env bash
# Builds the Debian package: sameport_VERSION_ARCH.deb, from packaging/debian, with
# dpkg-buildpackage -b, then checks it with lintian (no error, no warning).
#
#   sudo scripts/package.sh [--no-lintian]     (root: it installs the build dependencies)
#
# Installs what the build needs (debhelper, dpkg-dev, lintian and debian/control's Build-Depends)
# with apt-get, copies the tree (tracked and untracked files, not ignored ones) to
# .build-deb/source with packaging/debian as debian/, and builds there with SwiftPM's build
# directory at .build-deb/swift; both are kept between runs, so that the next build is
# incremental.
# The git commit of the checkout is passed on (SAMEPORT_GIT_COMMIT) for `sameport --version`.
# Prints the path of the .deb as its last line; the .deb, .buildinfo and .changes, and the source
# package (.dsc, .tar.xz), are in .build-deb/.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

lintian=yes
for argument in "$@"; do
    case "$argument" in
        --no-lintian) lintian=no ;;
        *) echo "usage: $0 [--no-lintian]" >&2; exit 2 ;;
    esac
done

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
export DEBIAN_FRONTEND=noninteractive
# The tools first (dpkg-checkbuilddeps, apt-get build-dep on a directory needs dpkg-dev), then the
# Build-Depends of debian/control itself: the one list.
tools=(debhelper dpkg-dev lintian)
missing=()
for package in "${tools[@]}"; do dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package"); done
updated=no
if [ ${#missing[@]} -gt 0 ]; then
    echo "package: installing ${missing[*]}"
    "${sudo_cmd[@]}" apt-get update -qq && updated=yes
    "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

export PATH="$PATH:/opt/swift/usr/bin"
command -v swift >/dev/null || { echo "package: swift not found (expected on PATH or at /opt/swift/usr/bin)" >&2; exit 1; }

out="$repo/.build-deb"
source="$out/source"
mkdir -p "$source"
# The copy is brought up to date rather than made anew: SwiftPM rebuilds a file whose inode
# changed, so an unchanged file keeps its copy (and a changed one is copied over it in place).
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    # Tracked and new files as they are in the work tree (a deleted one is skipped).
    git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' file; do [ -e "$file" ] && printf '%s\n' "$file"; done | sort >"$out/files"
else
    find . \( -name '.build*' -o -name .swiftpm -o -name .git \) -prune -o -type f -print | sed 's|^\./||' | sort >"$out/files"
fi
(cd "$source" && find . -path ./debian -prune -o -type f -print | sed 's|^\./||' | sort) |
    comm -23 - "$out/files" | (cd "$source" && xargs -r -d '\n' rm -f)
while IFS= read -r file; do
    cmp -s "$file" "$source/$file" || cp --parents -a "$file" "$source"
done <"$out/files"
rm -rf "$source/debian"
cp -a "$source/packaging/debian" "$source/debian"
# The copy has no .git: the commit goes along in the environment (empty outside a checkout).
commit=$(./scripts/git-commit.sh)

if ! (cd "$source" && dpkg-checkbuilddeps >/dev/null 2>&1); then
    echo "package: installing the build dependencies of debian/control"
    [ "$updated" = yes ] || "${sudo_cmd[@]}" apt-get update -qq
    (cd "$source" && "${sudo_cmd[@]}" apt-get build-dep -y -qq ./ >/dev/null)
fi

rm -f "$out"/sameport_*.deb "$out"/sameport-dbgsym_*.deb "$out"/sameport_*.buildinfo "$out"/sameport_*.changes
echo "package: dpkg-buildpackage -b in $source (commit ${commit:-none})"
(cd "$source" && SAMEPORT_GIT_COMMIT="$commit" SAMEPORT_SCRATCH="$out/swift" dpkg-buildpackage -b -us -uc)
deb=$(ls "$out"/sameport_*.deb)
[ "$(wc -l <<<"$deb")" -eq 1 ] || { echo "package: expected one sameport_*.deb in $out, saw: $deb" >&2; exit 1; }

if [ "$lintian" = yes ]; then
    echo "package: lintian $(basename "$deb")"
    # --fail-on error,warning: a warning fails the build like an error. The package needs no
    # override today; one would go in packaging/debian/sameport.lintian-overrides, with a
    # comment above it that says why.
    lintian --fail-on error,warning "$deb"
fi

# The source package as well (3.0 (native): the copy with its debian/, cleaned first), so that
# packaging/debian is known to make one; lintian checks it the same way.
rm -f "$out"/sameport_*.dsc "$out"/sameport_*.tar.xz "$out"/sameport_*_source.*
(cd "$source" && dpkg-buildpackage -S -us -uc -d >/dev/null)
dsc=$(ls "$out"/sameport_*.dsc)
if [ "$lintian" = yes ]; then
    echo "package: lintian $(basename "$dsc")"
    lintian --fail-on error,warning "$dsc"
fi
echo "$deb"
