#!/usr/bin/env bash
# Sets everything up and runs sameport on a ready-made example:
#
#   you ──▶ sameport 127.0.0.1:7000 ══(from 127.0.0.1:7000)══▶ demo upstream 127.0.0.1:9000
#
# The demo upstream (socat) answers each connection with the source address it sees, then echoes.
# The relay stays in the foreground until Ctrl-C; with --once it exits after the demonstration.
set -euo pipefail
cd "$(dirname "$0")/.."
LISTEN_PORT=${LISTEN_PORT:-7000}
UPSTREAM_PORT=${UPSTREAM_PORT:-9000}
once=false
[ "${1:-}" = "--once" ] && once=true

./scripts/setup.sh -c release >/dev/null
binary=$(/opt/swift/usr/bin/swift build -c release --show-bin-path)/sameport

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

socat "TCP-LISTEN:$UPSTREAM_PORT,bind=127.0.0.1,reuseaddr,fork" \
    SYSTEM:'echo "upstream: you are $SOCAT_PEERADDR:$SOCAT_PEERPORT"; cat' &
pids+=($!)

"$binary" --listen "127.0.0.1:$LISTEN_PORT" --upstream "127.0.0.1:$UPSTREAM_PORT" &
pids+=($!)

for _ in $(seq 200); do
    [ -n "$(ss -Hltn "sport = :$LISTEN_PORT")" ] && break
    sleep 0.05
done
sleep 0.1
echo
status=0
for attempt in 1 2; do
    echo "client $attempt: connecting to 127.0.0.1:$LISTEN_PORT"
    reply=$(printf 'hello through sameport\n' | socat -t 1 - "TCP:127.0.0.1:$LISTEN_PORT")
    printf '%s\n' "$reply" | sed 's/^/  /'
    case "$reply" in
        *"you are 127.0.0.1:$LISTEN_PORT"*) ;;
        *) status=1 ;;
    esac
done
echo
if [ "$status" -ne 0 ]; then
    echo "demo: the upstream did not see 127.0.0.1:$LISTEN_PORT as the source" >&2
    exit 1
fi
echo "The upstream saw 127.0.0.1:$LISTEN_PORT, the relay's own listening port, both times."
if $once; then exit 0; fi
echo "sameport is running. Try: socat - TCP:127.0.0.1:$LISTEN_PORT   (Ctrl-C here to stop)"
wait "${pids[1]}"
