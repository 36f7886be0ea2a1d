#!/usr/bin/env bash
# End-to-end test of packaging/systemd under a real systemd 252, booted in a container with
# systemd-nspawn (Debian package systemd-container), with a private network (loopback only).
#
#   sudo scripts/systemd-container-test.sh [SAMEPORT_BINARY]     (default: $SAMEPORT_BIN, else
#                                                                  .build/debug/sameport)
#
# The container boots the host's own root (a non-recursive bind mount of /, with a tmpfs overlay
# on top: nothing is written to the host) into a small target, sameport-test.target, that pulls
# in only sysinit.target. The binary is bound read-only to /usr/local/bin/sameport, the unit
# files to /etc/systemd/system, the configuration to /etc/sameport. An echo upstream on
# 127.0.0.1:9700 records the source address of each connection. Then:
#   - the shipped hardening runs `sameport check` and a relay that binds its own socket on a
#     port below 1024 (127.0.0.1:780, through CAP_NET_BIND_SERVICE);
#   - sameport.socket activates sameport.service on the first client, which relays from
#     127.0.0.1:7700 as a non-root user without CAP_CHOWN, is Type=notify with a watchdog,
#     reloads keeping an open connection, drains on stop, and logs with journal priorities;
#   - the template pair sameport@.socket/sameport@.service runs an instance `edge`.
#
#   sudo scripts/systemd-container-test.sh --deb sameport_VERSION_ARCH.deb
#
# installs the Debian package (scripts/package.sh builds it) in the same kind of container, with
# /opt (the Swift toolchain) hidden, instead of binding the binary and the units: the checks of
# its install, upgrade, removal and purge are in systemd-container-deb-checks.sh.
# Every check prints `PASS: ...`; the first failure prints `FAIL: expected ..., saw ...`, the
# container's journal and the nspawn log, and exits 1. All checks passed: exit 0, last line
# `systemd-container-test: all N checks passed`. Not root, or systemd-nspawn missing: exit 77.
#
# Runs in a mount namespace of its own; the container, the bind mount, the cgroups nspawn
# leaves (payload/, supervisor/) and /run/systemd/nspawn are removed on every exit. One run at a
# time (a lock on this file). Ports used inside the container: 7700-7702, 780, 9700.
set -euo pipefail
umask 022

# `producer | has PATTERN`: grep that reads its input to the end. `grep -q` stops at the first
# match, and under pipefail the producer's SIGPIPE (a long man page still being written) would
# fail the pipeline although the pattern was found.
has() { grep "$@" >/dev/null; }

readonly self=systemd-container-test
script=$(readlink -f "${BASH_SOURCE[0]}")
repo=$(dirname "$(dirname "$script")")
deb=""
binary=""
if [ "${1:-}" = --deb ]; then
    deb=${2:-}
else
    binary=${1:-${SAMEPORT_BIN:-$repo/.build/debug/sameport}}
fi

skip() { echo "$self: SKIP: $*"; exit 77; }
[ "$(id -u)" -eq 0 ] || skip "needs root (systemd-nspawn, mount, nsenter)"
command -v systemd-nspawn >/dev/null || skip "systemd-nspawn is missing: apt-get install systemd-container (scripts/setup.sh installs it)"
for tool in nsenter unshare setpriv mount umount mountpoint flock timeout pgrep ss; do
    command -v "$tool" >/dev/null || skip "$tool is missing"
done
[ -x /usr/bin/python3 ] || skip "/usr/bin/python3 is missing (the container's upstream and clients)"
if [ -n "$deb" ]; then
    [ -f "$deb" ] || { echo "$self: --deb needs the sameport .deb to install (scripts/package.sh builds it); saw '$deb'"; exit 2; }
    deb=$(readlink -f "$deb")
    case "$deb" in *:*) echo "$self: the package's path must not contain ':' (--bind-ro): $deb"; exit 2 ;; esac
    arguments=(--deb "$deb")
else
    [ -x "$binary" ] || { echo "$self: no sameport executable at $binary (build it: swift build)"; exit 2; }
    binary=$(readlink -f "$binary")
    case "$binary" in *:*) echo "$self: the binary's path must not contain ':' (--bind-ro): $binary"; exit 2 ;; esac
    arguments=("$binary")
fi

# A mount namespace of our own: the bind mount of / cannot outlive the test, whatever happens.
if [ -z "${SAMEPORT_CONTAINER_TEST_UNSHARED:-}" ]; then
    exec env SAMEPORT_CONTAINER_TEST_UNSHARED=1 unshare --mount --propagation private "$script" "${arguments[@]}"
fi

# One run at a time: nspawn's cgroups (payload/, supervisor/) have fixed names.
exec 9<"$script"
flock -w 300 9 || { echo "FAIL: another $self run held the lock for 300 s"; exit 1; }

# What a run killed outright (SIGKILL: no trap) left in /tmp: the empty mount point (rmdir only:
# it fails on anything still mounted or not empty) and the work directory (never holds a mount).
for stale in /tmp/sameport-nspawn-root.*; do [ -d "$stale" ] && ! mountpoint -q "$stale" && rmdir "$stale" 2>/dev/null || true; done
for stale in /tmp/sameport-nspawn-work.*; do
    [ -d "$stale" ] && ! awk -v p="$stale" 'index($5, p) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo &&
        rm -rf "$stale" || true
done

started=$(date +%s%N)
checks=0
nspawn_pid=""
leader=""
rootdir=""
workdir=""
log=""
failure=""
helpers=()
cgroup_bases=()
machine="sameport-test-$$"
helper="$repo/scripts/systemd-container-helper.py"
units="$repo/packaging/systemd"

pass() { checks=$((checks + 1)); echo "PASS: $*"; }
fail() { failure="FAIL: $*"; echo "$failure"; exit 1; }
now_ns() { date +%s%N; }
elapsed() { local ns=$(( $(now_ns) - $1 )); printf '%d.%02d s' $((ns / 1000000000)) $((ns % 1000000000 / 10000000)); }

# wait_for SECONDS COMMAND...: runs COMMAND every 0.1 s until it succeeds; 1 after SECONDS.
wait_for() {
    local deadline=$(( $(now_ns) + $1 * 1000000000 ))
    shift
    until "$@"; do
        [ "$(now_ns)" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# Commands in the container: every namespace (its systemd, /proc, journal), or only its network
# (the host's files: the helper and the work directory).
inside() { timeout -k 5 "${inside_timeout:-30}" nsenter -t "$leader" -a "$@"; }
innet() { timeout -k 5 "${inside_timeout:-60}" nsenter -t "$leader" -n "$@"; }
prop() { inside systemctl show -p "$2" --value "$1"; }
journal() { inside journalctl --no-pager -q -o cat "$@"; }

# --- Cleanup, on every exit ---------------------------------------------------------------

cgroup_mounts() {  # "unified-mount name=systemd-mount", either may be empty
    awk '$9 == "cgroup2" { u = $5 } $9 == "cgroup" && $NF ~ /(^|,)name=systemd(,|$)/ { s = $5 } END { print u, s }' /proc/self/mountinfo
}

remove_cgroup_leftovers() {  # rmdir, deepest first, payload/ and supervisor/ under each base
    local base dir
    for base in "${cgroup_bases[@]}"; do
        for dir in "$base/payload" "$base/supervisor"; do
            [ -d "$dir" ] || continue
            wait_for 10 eval "find '$dir' -depth -type d -exec rmdir {} + 2>/dev/null; [ ! -d '$dir' ]" ||
                echo "$self: could not remove $dir: $(find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null | tr '\n' ' ')" >&2
        done
    done
}

diagnostics() {
    echo "----- systemctl status (container) -----"
    inside_timeout=10 inside systemctl --no-pager --full status 'sameport*' 2>&1 | tail -n 60
    echo "----- journalctl -u 'sameport*' (container) -----"
    inside_timeout=10 inside journalctl --no-pager -o short-monotonic -u 'sameport*' 2>&1 | tail -n 120
    echo "----- journalctl -u sameport-test-upstream (container) -----"
    inside_timeout=10 inside journalctl --no-pager -o short-monotonic -u sameport-test-upstream 2>&1 | tail -n 20
}

cleanup() {
    local status=$? pid dir
    set +e
    trap - EXIT INT TERM HUP
    if [ "$status" -ne 0 ] && [ -n "$leader" ] && kill -0 "$leader" 2>/dev/null; then
        diagnostics
    fi
    for pid in "${helpers[@]}"; do kill "$pid" 2>/dev/null; done
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        # SIGTERM: nspawn asks the container's systemd to power off (SIGRTMIN+3).
        kill -TERM "$nspawn_pid"
        if ! wait_for 20 eval "! kill -0 $nspawn_pid 2>/dev/null"; then
            echo "$self: the container did not power off within 20 s; killing it" >&2
            [ -n "$leader" ] && kill -KILL "$leader" 2>/dev/null
            kill -KILL "$nspawn_pid" 2>/dev/null
            wait_for 10 eval "! kill -0 $nspawn_pid 2>/dev/null" || echo "$self: nspawn $nspawn_pid survived SIGKILL" >&2
        fi
    fi
    [ -n "$nspawn_pid" ] && wait "$nspawn_pid" 2>/dev/null
    for pid in "${helpers[@]}"; do wait "$pid" 2>/dev/null; done
    if [ "$status" -ne 0 ] && [ -n "$log" ] && [ -s "$log" ]; then
        echo "----- systemd-nspawn log (last 60 lines) -----"
        tail -n 60 "$log"
    fi
    if [ -n "$rootdir" ]; then
        if mountpoint -q "$rootdir"; then
            wait_for 5 umount "$rootdir" 2>/dev/null || umount -l "$rootdir"
        fi
        # Only rmdir: never a recursive removal of a directory that held the host's root.
        mountpoint -q "$rootdir" || rmdir "$rootdir"
    fi
    remove_cgroup_leftovers
    if [ -d /run/systemd/nspawn ]; then
        # Ours, and those of runs killed outright (we hold the lock: none is running). Empty
        # directories: rmdir.
        for dir in /run/systemd/nspawn/propagate/sameport-test-*; do
            [ ! -d "$dir" ] || rmdir "$dir"
        done
        rmdir /run/systemd/nspawn/propagate /run/systemd/nspawn/locks /run/systemd/nspawn 2>/dev/null
    fi
    [ -n "$workdir" ] && rm -rf "$workdir"
    if [ -z "$failure" ] && [ "$status" -ne 0 ] && [ "$status" -ne 77 ]; then
        failure="FAIL: every command to succeed; one in a function failed (exit $status), see above"
    fi
    if [ -n "$failure" ]; then
        echo "$failure"  # again, as the last line
    fi
    exit "$status"
}
trap cleanup EXIT
# A command that fails outside a check (set -e) is a failure too, and says so.
trap 'status=$?; if [ -z "$failure" ]; then failure="FAIL: a command to succeed; line $LINENO exited $status: $BASH_COMMAND"; echo "$failure"; fi' ERR
trap 'failure="FAIL: interrupted"; exit 130' INT
trap 'failure="FAIL: terminated"; exit 143' TERM HUP

# --- Checks on the unit files, on the host ------------------------------------------------

# The template's [Service] settings are sameport.service's but for the instance-specific ones.
settings() { sed -n '/^\[Service\]/,$p' "$1" | grep -v -e '^#' -e '^$'; }
template_diff=$(diff <(settings "$units/sameport.service") <(settings "$units/sameport@.service" | sed \
    -e 's|/etc/sameport/%i.toml|/etc/sameport/sameport.toml|g' -e 's|^User=sameport-%i$|User=sameport|' \
    -e 's|^SyslogIdentifier=sameport-%i$|SyslogIdentifier=sameport|' -e 's|^Also=sameport@%i.socket$|Also=sameport.socket|')) ||
    fail "sameport@.service to have sameport.service's settings but for name, user and file; differences: $template_diff"
pass "sameport@.service has the same [Service] settings as sameport.service (but the instance's file, user and log name)"

security=$(systemd-analyze security --no-pager --offline=yes "$units/sameport.service" 2>&1) ||
    fail "systemd-analyze security --offline=yes to succeed; saw: $(tail -n 3 <<<"$security")"
exposure=$(sed -n 's/.*Overall exposure level for sameport.service: \([0-9.]*\) .*/\1/p' <<<"$security")
[ -n "$exposure" ] && awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }' ||
    fail "an exposure level of 2.0 or less from systemd-analyze security; saw '$exposure'"
pass "systemd-analyze security --offline=yes sameport.service: exposure $exposure"

# --- The container ------------------------------------------------------------------------

rootdir=$(mktemp -d /tmp/sameport-nspawn-root.XXXXXX)
workdir=$(mktemp -d /tmp/sameport-nspawn-work.XXXXXX)
chmod 0755 "$workdir"
log="$workdir/nspawn.log"

# nspawn (--keep-unit) makes payload/ and supervisor/ in our cgroup, in the unified hierarchy and
# in the name=systemd one of a hybrid layout. Stale ones from a run that was killed go first.
read -r unified_mount systemd_mount < <(cgroup_mounts)
if [ -n "$unified_mount" ]; then
    cgroup_bases+=("$unified_mount$(sed -n 's/^0:://p' /proc/self/cgroup)")
fi
if [ -n "${systemd_mount:-}" ]; then
    cgroup_bases+=("$systemd_mount$(sed -n 's/^[0-9]*:name=systemd://p' /proc/self/cgroup)")
fi
cgroup_procs() { find "$1" -name cgroup.procs -exec cat {} + 2>/dev/null | tr '\n' ' '; }
for base in "${cgroup_bases[@]}"; do
    for dir in "$base/payload" "$base/supervisor"; do
        [ -d "$dir" ] || continue
        # A container of a run killed outright (SIGKILL) outlives it: its PID 1 (PID 1 of its own
        # namespace, booted into sameport-test.target) is ours to end, and takes the rest with it.
        for pid in $(cgroup_procs "$dir"); do
            if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | has 'systemd.unit=sameport-test.target' &&
                grep -Eq '^NSpid:.*[[:space:]]1$' "/proc/$pid/status" 2>/dev/null; then
                echo "$self: ending the container of a run that was killed (its PID 1 is host PID $pid)"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        done
        wait_for 10 eval '[ -z "$(cgroup_procs "$dir" | tr -d " ")" ]' ||
            fail "no other container in this cgroup; $dir holds processes $(cgroup_procs "$dir")"
        echo "$self: removing a stale $dir"
    done
done
remove_cgroup_leftovers

mkdir -p "$workdir/units" "$workdir/etc"
cp "$units/sameport.socket" "$units/sameport.service" "$units/sameport@.socket" "$units/sameport@.service" "$workdir/units/"
cat >"$workdir/units/sameport-test.target" <<'EOF'
[Unit]
Description=sameport container test (sysinit.target only)
Requires=sysinit.target
After=sysinit.target
# Only to keep these units loaded once stopped, so that their exit status can be read (an
# unreferenced inactive unit is unloaded at once). None of them is pulled in.
Before=sameport-probe.service sameport.service sameport@edge.service
EOF
# The shipped service with its hardening unchanged, binding its own socket (no .socket, Type=exec,
# no watchdog, no restart), and `sameport check` as ExecStartPre=.
sed -e '/^Requires=sameport.socket$/d' -e '/^After=sameport.socket$/d' \
    -e 's/^Description=.*/Description=sameport, shipped hardening, own socket (test probe)/' \
    -e 's/^Type=notify$/Type=exec/' -e '/^WatchdogSec=/d' -e 's/^Restart=on-failure$/Restart=no/' \
    -e 's|/etc/sameport/sameport.toml|/etc/sameport/probe.toml|g' -e 's/^SyslogIdentifier=sameport$/SyslogIdentifier=sameport-probe/' \
    -e 's|^ExecStart=\(.*\) run \(.*\)$|ExecStartPre=\1 check \2\nExecStart=\1 run \2|' \
    "$units/sameport.service" >"$workdir/units/sameport-probe.service"
missing=$(comm -23 <(sed -n '/^# --- Who it runs as/,/^\[Install\]/p' "$units/sameport.service" | grep -v -e '^#' -e '^$' | sort) \
                   <(sort "$workdir/units/sameport-probe.service"))
[ -z "$missing" ] || fail "the probe unit to keep every hardening line; missing: $missing"
mkdir -p "$workdir/units/sameport@edge.socket.d"
printf '[Socket]\nListenStream=127.0.0.1:7702\n' >"$workdir/units/sameport@edge.socket.d/listen.conf"

cp "$repo/Config/socket-activated.toml" "$workdir/etc/sameport.toml"
relay() { printf '\n[[relay]]\nname = "%s"\nlisten = "%s"\nupstream = "127.0.0.1:9700"\n' "$1" "$2"; }
relay probe 127.0.0.1:780 >"$workdir/etc/probe.toml"
relay edge 127.0.0.1:7702 >"$workdir/etc/edge.toml"
{ cat "$repo/Config/socket-activated.toml"; relay extra 127.0.0.1:7701; } >"$workdir/reloaded.toml"
{ cat "$repo/Config/socket-activated.toml"; printf 'no_such_key = 1\n'; } >"$workdir/broken.toml"
chmod 0644 "$workdir"/etc/*.toml "$workdir"/*.toml
# A new configuration: renamed over the old one, inside the directory bound to /etc/sameport.
install_config() { cp "$1" "$workdir/etc/.next.toml" && mv -f "$workdir/etc/.next.toml" "$workdir/etc/sameport.toml"; }

# What the container sees of ours: the binary, the units and their files (or, with --deb, the
# package and its bumped copy, with /opt and the Swift toolchain hidden by an empty tmpfs), the
# boot target and the helper.
if [ -n "$deb" ]; then
    # prepare_debs and deb_checks.
    # shellcheck source=systemd-container-deb-checks.sh
    source "$repo/scripts/systemd-container-deb-checks.sh"
    mkdir -p "$workdir/debs"
    prepare_debs "$deb" "$workdir/debs"
    # /etc/systemd/system starts empty but for the boot target, so that no unit of the host's
    # shadows the package's (nspawn mounts the tmpfs before the file bound into it).
    binds=(--bind-ro="$workdir/debs:/srv/sameport-test-debs" --tmpfs=/opt --tmpfs=/etc/systemd/system
           --bind-ro="$workdir/units/sameport-test.target:/etc/systemd/system/sameport-test.target")
else
    binds=(--bind-ro="$binary:/usr/local/bin/sameport" --bind-ro="$workdir/units:/etc/systemd/system"
           --bind-ro="$workdir/etc:/etc/sameport")
fi
binds+=(--bind-ro="$helper:/usr/local/lib/sameport-test/helper.py")

mount --bind / "$rootdir"
boot_start=$(now_ns)
# --pdeathsig: should this script be killed outright (no trap), nspawn gets SIGKILL too. The
# container's systemd outlives it; the next run ends it and removes the cgroups (see above).
# The lock (fd 9) stays with the script.
setpriv --pdeathsig KILL -- systemd-nspawn --register=no --keep-unit --volatile=overlay --private-network \
    --machine="$machine" -D "$rootdir" --console=read-only \
    "${binds[@]}" \
    --boot systemd.unit=sameport-test.target systemd.log_color=0 \
    </dev/null >"$log" 2>&1 9<&- &
nspawn_pid=$!

find_leader() {
    kill -0 "$nspawn_pid" 2>/dev/null || fail "systemd-nspawn to keep running; it exited (log above)"
    local pid
    for pid in $(pgrep -P "$nspawn_pid"); do
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = systemd ]; then leader=$pid; return 0; fi
    done
    return 1
}
wait_for 20 find_leader || fail "the container's systemd (a child of nspawn $nspawn_pid) within 20 s; saw none"
booted() {
    state=$(inside_timeout=10 inside systemctl is-system-running --wait 2>/dev/null) || true
    case "$state" in running|degraded) return 0 ;; *) return 1 ;; esac
}
wait_for 30 booted || fail "the container's systemd to reach running or degraded within 30 s; saw '${state:-nothing}'"
pass "systemd $(inside systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p') booted in the container in $(elapsed "$boot_start") ($state, container PID 1 is host PID $leader)"

inside ip link set lo up
inside ip -4 addr show dev lo | has 'inet 127.0.0.1/8' || fail "127.0.0.1 on the container's lo; saw: $(inside ip addr show dev lo)"

[ -n "$deb" ] || {
verify=$(inside systemd-analyze verify sameport.socket sameport.service sameport@edge.socket sameport@edge.service sameport-probe.service 2>&1) ||
    fail "systemd-analyze verify to accept the units; saw: $verify"
[ -z "$verify" ] || fail "no warnings from systemd-analyze verify; saw: $verify"
pass "systemd-analyze verify accepts sameport.socket, sameport.service, sameport@edge.socket/.service (instance with its ListenStream= drop-in)"
}

inside systemd-run --quiet --unit=sameport-test-upstream -p Type=exec \
    /usr/bin/python3 /usr/local/lib/sameport-test/helper.py upstream --listen 127.0.0.1:9700 --peers /run/sameport-test-peers
listening() { [ -n "$(inside ss -Hltn 'sport = :'"$1")" ]; }
wait_for 10 listening 9700 || fail "the upstream on 127.0.0.1:9700 within 10 s; $(inside systemctl --no-pager status sameport-test-upstream 2>&1 | tail -n 5)"
peers() { inside cat /run/sameport-test-peers 2>/dev/null || true; }
# saw_peer ADDRESS COUNT: the upstream saw ADDRESS as source at least COUNT times.
saw_peer() { [ "$(peers | grep -cx "$1")" -ge "$2" ]; }

# echo_through PORT WHAT [UNIT]: 64 KiB through 127.0.0.1:PORT, back byte for byte; the helper's
# line in $echoed. On failure, UNIT's state and last journal lines are shown too.
echo_through() {
    local context=""
    if ! echoed=$(innet /usr/bin/python3 "$helper" echo --connect "127.0.0.1:$1" --size 65536 --timeout "${echo_timeout:-15}" 2>&1); then
        [ -z "${3:-}" ] || context="; $3: $(unit_state "$3"); its own last lines: $(inside journalctl --no-pager -q -o short -u "$3" | grep -v ' systemd\[1\]: ' | tail -n 2 | cut -d' ' -f5- | tr '\n' ' ')"
        fail "64 KiB echoed through 127.0.0.1:$1 ($2); saw: $echoed$context"
    fi
}

unit_state() { echo "ActiveState=$(prop "$1" ActiveState) SubState=$(prop "$1" SubState) Result=$(prop "$1" Result) ExecMainCode=$(prop "$1" ExecMainCode) ExecMainStatus=$(prop "$1" ExecMainStatus)"; }
is_state() { [ "$(prop "$1" ActiveState)" = "$2" ]; }
# The service ended by itself with exit 0 (CLD_EXITED = 1), not killed, not failed.
check_clean_exit() {
    [ "$(prop "$1" ActiveState)" = inactive ] && [ "$(prop "$1" Result)" = success ] &&
        [ "$(prop "$1" ExecMainCode)" = 1 ] && [ "$(prop "$1" ExecMainStatus)" = 0 ] ||
        fail "$1 inactive after a clean exit 0 (ActiveState=inactive Result=success ExecMainCode=1 ExecMainStatus=0); saw $(unit_state "$1")"
}
# check_user UNIT [dropped]: the main process runs as a non-root user, with no capability but
# CAP_CHOWN and CAP_NET_BIND_SERVICE (0x401) in any set; with `dropped`, without CAP_CHOWN in its
# effective, permitted, inheritable or ambient sets (sameport drops it after the fchown of an
# inherited socket; the bounding set keeps it, since dropping that needs CAP_SETPCAP).
check_user() {
    local pid status uids gids set value caps=""
    pid=$(prop "$1" MainPID)
    status=$(inside cat "/proc/$pid/status")
    uids=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' <<<"$status")
    gids=$(awk '/^Gid:/ { print $2, $3, $4, $5 }' <<<"$status")
    awk '{ for (i = 1; i <= 4; i++) if ($i == 0 || $i != $1) exit 1 }' <<<"$uids" ||
        fail "$1 (PID $pid) running as one non-root user; saw Uid: $uids"
    awk '{ for (i = 1; i <= 4; i++) if ($i == 0) exit 1 }' <<<"$gids" || fail "$1 (PID $pid) with a non-root group; saw Gid: $gids"
    pass "$1 runs as a non-root user (PID $pid, uid $(cut -d' ' -f1 <<<"$uids") $(inside getent passwd "$(cut -d' ' -f1 <<<"$uids")" | cut -d: -f1), gid $(cut -d' ' -f1 <<<"$gids"))"
    for set in CapEff CapPrm CapInh CapAmb CapBnd; do
        value=$(awk -v k="$set:" '$1 == k { print $2 }' <<<"$status")
        [ -n "$value" ] && (( (16#$value & ~16#401) == 0 )) ||
            fail "no capability but CAP_CHOWN and CAP_NET_BIND_SERVICE (0x401) in $set of $1 (PID $pid); saw $set: $value"
        if [ "${2:-}" = dropped ] && [ "$set" != CapBnd ]; then
            (( (16#$value & 1) == 0 )) || fail "no CAP_CHOWN (bit 0) in $set of $1 (PID $pid) once it runs; saw $set: $value"
        fi
        caps+=" $set ${value#00000000}"
    done
    if [ "${2:-}" = dropped ]; then
        pass "$1 holds no CAP_CHOWN (bit 0) in CapEff, CapPrm, CapInh, CapAmb:$caps"
    else
        pass "$1 holds no capability beyond CAP_CHOWN and CAP_NET_BIND_SERVICE:$caps"
    fi
}

# A session: one connection held by the helper, driven through a FIFO (fd 8, open read-write so
# that neither side blocks), one result line per command.
session_start() {  # PORT
    rm -f "$workdir/session.cmd" "$workdir/session.out"
    mkfifo "$workdir/session.cmd"
    : >"$workdir/session.out"
    exec 8<>"$workdir/session.cmd"
    inside_timeout=180 innet /usr/bin/python3 "$helper" session --connect "127.0.0.1:$1" \
        --commands "$workdir/session.cmd" --results "$workdir/session.out" --timeout 15 9<&- &
    session_pid=$!
    helpers+=("$session_pid")
    session_lines=0
    session_expect "connected 127.0.0.1:"
}
session_expect() {  # PREFIX: the next result line starts with PREFIX
    session_lines=$((session_lines + 1))
    wait_for 20 eval '[ "$(wc -l <"$workdir/session.out")" -ge '"$session_lines"' ]' ||
        fail "a result from the session helper within 20 s ('$1...'); saw: $(cat "$workdir/session.out")"
    session_result=$(sed -n "${session_lines}p" "$workdir/session.out")
    [[ "$session_result" == "$1"* ]] || fail "'$1...' from the held connection; saw '$session_result'"
}
session_do() {  # COMMAND EXPECTED-PREFIX
    echo "$1" >&8
    session_expect "$2"
}
session_end() {
    session_do close closed
    wait "$session_pid" 2>/dev/null || true
    exec 8>&-
}

# --- With --deb: the Debian package's life instead of the units' -----------------------------
if [ -n "$deb" ]; then
    deb_checks
    echo "$self: finished in $(elapsed "$started")"
    echo "$self: all $checks checks passed"
    exit 0
fi

# --- The shipped hardening runs sameport (no socket activation) ----------------------------

inside systemctl start sameport-probe.service ||
    fail "sameport-probe.service (the shipped hardening, sameport check as ExecStartPre=) to start; saw $(unit_state sameport-probe.service)"
wait_for 10 listening 780 || fail "the probe relay listening on 127.0.0.1:780 within 10 s; saw $(unit_state sameport-probe.service)"
journal -u sameport-probe.service | has 'configuration OK' ||
    fail "'configuration OK' from sameport check under the hardening; saw: $(journal -u sameport-probe.service | tail -n 5)"
pass "sameport check runs under the shipped hardening (ExecStartPre= of the probe unit)"
echo_through 780 "probe relay under the shipped hardening"
pass "under the shipped hardening, sameport binds 127.0.0.1:780 itself (a port below 1024: CAP_NET_BIND_SERVICE) and relays: $echoed"
wait_for 5 saw_peer 127.0.0.1:780 1 || fail "the upstream to see source 127.0.0.1:780; saw: $(peers)"
pass "the upstream saw the probe's connection from 127.0.0.1:780 (the egress bind below 1024 works too)"
check_user sameport-probe.service
inside systemctl stop sameport-probe.service
check_clean_exit sameport-probe.service
pass "sameport-probe.service stopped with exit 0 under the hardening (no system call refused fatally)"

# --- Socket activation --------------------------------------------------------------------

inside systemctl start sameport.socket || fail "sameport.socket to start; saw $(unit_state sameport.socket)"
[ "$(prop sameport.socket ActiveState)" = active ] && [ "$(prop sameport.socket SubState)" = listening ] ||
    fail "sameport.socket active and listening; saw $(unit_state sameport.socket)"
[ "$(prop sameport.service ActiveState)" = inactive ] && [ "$(prop sameport.service MainPID)" = 0 ] ||
    fail "sameport.service not running before the first client; saw $(unit_state sameport.service) MainPID=$(prop sameport.service MainPID)"
listener=$(inside ss -Hltnp 'sport = :7700')
grep -q '("systemd",pid=1,' <<<"$listener" || fail "systemd (PID 1) holding 127.0.0.1:7700; saw: $listener"
pass "sameport.socket listens on 127.0.0.1:7700 (held by PID 1); sameport.service is not running yet"

echo_through 7700 "the first client, which activates sameport.service" sameport.service
pass "the first client activated sameport.service and $echoed"
[ "$(prop sameport.service Type)" = notify ] && wait_for 5 is_state sameport.service active ||
    fail "sameport.service (Type=notify) active; saw Type=$(prop sameport.service Type) $(unit_state sameport.service)"
status_text=$(prop sameport.service StatusText)
[ -n "$status_text" ] || fail "a STATUS= text from sameport.service (StatusText); saw none"
pass "sameport.service (Type=notify) is active, so it sent READY=1; status: '$status_text'"
mainpid=$(prop sameport.service MainPID)
check_user sameport.service dropped
listener=$(inside ss -Hltnpe 'sport = :7700')
[ "$(wc -l <<<"$listener")" -eq 1 ] || fail "one listening socket on 127.0.0.1:7700 (the inherited one); saw: $listener"
grep -q "(\"sameport\",pid=$mainpid," <<<"$listener" && grep -q '("systemd",pid=1,' <<<"$listener" ||
    fail "the listening socket shared by PID 1 and sameport (PID $mainpid); saw: $listener"
service_uid=$(awk '/^Uid:/ { print $2 }' < <(inside cat "/proc/$mainpid/status"))
grep -q " uid:$service_uid " <<<"$listener" || fail "the inherited socket owned by the service's uid $service_uid (fchown); saw: $listener"
pass "sameport uses the inherited socket (one listener, shared by PID 1 and sameport), owned by its uid $service_uid"
wait_for 5 saw_peer 127.0.0.1:7700 1 || fail "the upstream to see source 127.0.0.1:7700; saw: $(peers)"
pass "the upstream saw the relayed connection from 127.0.0.1:7700"
ended() { journal -u sameport.service | grep 'connection ended' | grep "relay=$1 " | grep "egress=$2 " | grep 'upstream=127.0.0.1:9700 ' | has 'end=completed'; }
wait_for 5 ended proxy 127.0.0.1:7700 ||
    fail "a 'connection ended relay=proxy ... egress=127.0.0.1:7700 upstream=127.0.0.1:9700 ... end=completed' line in the journal; saw: $(journal -u sameport.service | tail -n 5)"
pass "the journal has the connection's line: $(journal -u sameport.service | grep 'connection ended' | tail -n 1)"

watchdog=$(prop sameport.service WatchdogUSec)
case "$watchdog" in ""|0|infinity) fail "a watchdog on sameport.service; saw WatchdogUSec=$watchdog" ;; esac
first=$(prop sameport.service WatchdogTimestampMonotonic)
advanced() { [ "$(prop sameport.service WatchdogTimestampMonotonic)" -gt "$first" ]; }
wait_for 12 advanced || fail "WatchdogTimestampMonotonic to advance within 12 s (WATCHDOG=1 every WatchdogSec/2); it stayed $first"
pass "the watchdog is armed (WatchdogUSec=$watchdog) and sameport pings it (WatchdogTimestampMonotonic $first -> $(prop sameport.service WatchdogTimestampMonotonic))"

# Reload with a second relay, 127.0.0.1:7701, while a connection is open on 7700.
session_start 7700
session_do "send before-reload" "ok before-reload"
reload_start=$(now_ns)
install_config "$workdir/reloaded.toml"
inside systemctl reload sameport.service || fail "systemctl reload sameport.service to succeed; saw $(unit_state sameport.service)"
reloaded() { journal -u sameport.service | has 'reloaded /etc/sameport/sameport.toml'; }
wait_for 10 reloaded || fail "'reloaded /etc/sameport/sameport.toml' in the journal within 10 s; saw: $(journal -u sameport.service | tail -n 5)"
wait_for 10 is_state sameport.service active || fail "sameport.service active again after the reload (READY=1); saw $(unit_state sameport.service)"
[ "$(prop sameport.service MainPID)" = "$mainpid" ] && [ "$(prop sameport.service NRestarts)" = 0 ] ||
    fail "the same process (PID $mainpid, no restart) after the reload; saw MainPID=$(prop sameport.service MainPID) NRestarts=$(prop sameport.service NRestarts)"
pass "systemctl reload: '$(journal -u sameport.service | grep 'reloaded /etc/sameport/sameport.toml' | tail -n 1)' in $(elapsed "$reload_start"), same PID $mainpid, active"
session_do "send after-reload" "ok after-reload"
pass "a connection open across the reload still relays both ways"
echo_through 7701 "the relay added by the reload"
wait_for 5 saw_peer 127.0.0.1:7701 1 || fail "the upstream to see source 127.0.0.1:7701; saw: $(peers)"
pass "the relay added by the reload works, from 127.0.0.1:7701: $echoed"

# A broken file: systemctl reload refuses it (ExecReload= runs sameport check first), and a SIGHUP
# that reaches sameport anyway keeps the previous configuration.
install_config "$workdir/broken.toml"
if inside systemctl reload sameport.service 2>/dev/null; then fail "systemctl reload to fail on a broken file (ExecReload=sameport check); it succeeded"; fi
wait_for 10 is_state sameport.service active && [ "$(prop sameport.service MainPID)" = "$mainpid" ] ||
    fail "sameport.service still active, PID $mainpid, after a refused reload; saw $(unit_state sameport.service) MainPID=$(prop sameport.service MainPID)"
pass "systemctl reload fails on a broken file ($(journal -u sameport.service | grep -m1 'no_such_key' || echo 'sameport check refused it')); the service runs on"
inside systemctl kill --kill-who=main --signal=SIGHUP sameport.service
reload_failed() { journal -u sameport.service | has 'reload failed, still running the previous configuration'; }
wait_for 10 reload_failed || fail "'reload failed, still running the previous configuration' after SIGHUP with a broken file; saw: $(journal -u sameport.service | tail -n 5)"
wait_for 10 is_state sameport.service active && [ "$(prop sameport.service MainPID)" = "$mainpid" ] ||
    fail "sameport.service active, PID $mainpid, after a failed reload; saw $(unit_state sameport.service) MainPID=$(prop sameport.service MainPID)"
session_do "send after-failed-reload" "ok after-failed-reload"
echo_through 7701 "the previous configuration's second relay, after a failed reload"
pass "a SIGHUP with a broken file keeps the previous configuration (7701 still relays, the open connection too)"
install_config "$workdir/reloaded.toml"
session_end

# Journal priorities: sameport's <N> prefixes under JOURNAL_STREAM.
journal -u sameport.service -p notice | has 'reloaded /etc/sameport/sameport.toml' ||
    fail "the 'reloaded' line at notice or above (journalctl -p notice); saw: $(journal -u sameport.service -p notice | tail -n 5)"
! journal -u sameport.service -p notice | has 'connection ended' ||
    fail "no 'connection ended' (info) line in journalctl -p notice; saw: $(journal -u sameport.service -p notice | grep 'connection ended' | head -n 1)"
journal -u sameport.service -p warning | has 'reload failed' ||
    fail "the 'reload failed' line at warning or above (journalctl -p warning); saw: $(journal -u sameport.service -p warning | tail -n 5)"
! journal -u sameport.service -p warning | has -e 'connection ended' -e 'reloaded /etc' ||
    fail "journalctl -p warning without info and notice lines; saw: $(journal -u sameport.service -p warning | head -n 5)"
! journal -u sameport.service | has '^<[0-7]>' ||
    fail "no raw '<N>' prefixes in the journal; saw: $(journal -u sameport.service | grep -m1 '^<[0-7]>')"
pass "journal priorities: 'reloaded' at notice, 'reload failed' at warning, 'connection ended' below both (-p filters them), no raw <N> prefixes"

# Stop with an open connection: STOPPING=1, the connection drains, then exit 0.
session_start 7700
session_do "send before-stop" "ok before-stop"
stop_start=$(now_ns)
inside systemctl stop --no-block sameport.service 2>/dev/null  # not the "can still be activated by sameport.socket" warning
stopping() { [ "$(prop sameport.service ActiveState)" = deactivating ]; }
wait_for 5 stopping || fail "sameport.service deactivating (draining) with a connection open; saw $(unit_state sameport.service)"
session_do "send while-draining" "ok while-draining"
is_state sameport.service deactivating || fail "sameport.service still draining while a connection is open; saw $(unit_state sameport.service)"
pass "on stop, sameport drains: the open connection still relays while the service is deactivating"
session_end
wait_for 10 is_state sameport.service inactive || fail "sameport.service inactive within 10 s of its last connection closing; saw $(unit_state sameport.service)"
check_clean_exit sameport.service
journal -u sameport.service | has 'stopped' || fail "a 'stopped' line in the journal; saw: $(journal -u sameport.service | tail -n 3)"
pass "sameport.service stopped cleanly (exit 0, not failed) $(elapsed "$stop_start") after the stop request, once its connection closed"

# The socket outlives the service (sameport never shut it down): the next client activates again.
[ "$(prop sameport.socket SubState)" = listening ] || fail "sameport.socket listening after the service stopped; saw $(unit_state sameport.socket)"
echo_through 7700 "a client after the stop, which activates the service again"
wait_for 5 is_state sameport.service active || fail "sameport.service active again; saw $(unit_state sameport.service)"
[ "$(prop sameport.service MainPID)" != "$mainpid" ] || fail "a new process after re-activation; saw the old PID $mainpid"
wait_for 5 saw_peer 127.0.0.1:7700 2 || fail "the upstream to see 127.0.0.1:7700 a second time; saw: $(peers)"
pass "the socket outlived the service: the next client activated it again (PID $(prop sameport.service MainPID)) and $echoed"
stop_start=$(now_ns)
inside systemctl stop sameport.service 2>/dev/null  # (the same warning)
check_clean_exit sameport.service
stop_ns=$(( $(now_ns) - stop_start ))
[ "$stop_ns" -lt 5000000000 ] || fail "an idle sameport.service to stop within 5 s; it took $(elapsed "$stop_start")"
pass "an idle sameport.service stops in $(elapsed "$stop_start"), inactive and not failed"
inside systemctl stop sameport.socket

# --- The template pair: instance `edge` on 127.0.0.1:7702 (ListenStream= from a drop-in) -------

inside systemctl start sameport@edge.socket || fail "sameport@edge.socket to start; saw $(unit_state sameport@edge.socket)"
[ "$(prop sameport@edge.service ActiveState)" = inactive ] || fail "sameport@edge.service not running before its first client; saw $(unit_state sameport@edge.service)"
echo_through 7702 "instance edge of the template" sameport@edge.service
wait_for 5 is_state sameport@edge.service active || fail "sameport@edge.service active; saw $(unit_state sameport@edge.service)"
wait_for 5 saw_peer 127.0.0.1:7702 1 || fail "the upstream to see source 127.0.0.1:7702; saw: $(peers)"
pass "sameport@edge.socket activated sameport@edge.service (/etc/sameport/edge.toml, fd name edge); the upstream saw 127.0.0.1:7702; $echoed"
check_user sameport@edge.service dropped
inside systemctl stop sameport@edge.service sameport@edge.socket
check_clean_exit sameport@edge.service
pass "sameport@edge.service stopped cleanly"

echo "$self: finished in $(elapsed "$started")"
echo "$self: all $checks checks passed"
