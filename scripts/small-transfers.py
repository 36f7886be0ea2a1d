#!/usr/bin/env python3
"""Small transfers through sameport: the relay's CPU per connection and per round trip.

    ./scripts/small-transfers.py [--rounds 3] [-- EXTRA SAMEPORT FLAGS]

Builds nothing: run `swift build -c release` first. An echo server on 127.0.0.1 answers; for each
payload size the script runs
  - connections: 2,000 sequential connections that each send SIZE bytes, half-close and read the
    echo to EOF (each connection pays for its own pipes on the splice path);
  - ping-pong: 5,000 round trips of SIZE bytes on one connection.
The relay is started once per flag set and the flag sets are measured in alternation (`--splice
on` and `--splice off` by default, plus the flags after `--`), `--rounds` times; the medians of
the relay's CPU time (from /proc) and of the wall time are printed. Loopback only; Python's own
speed bounds the wall times, so compare the relay's CPU. Not a test: numbers depend on the machine.
"""
import os, socket, statistics, subprocess, sys, threading, time

args = sys.argv[1:]
extra = args[args.index("--") + 1:] if "--" in args else []
args = args[: args.index("--")] if "--" in args else args
rounds = int(args[args.index("--rounds") + 1]) if "--rounds" in args else 3
sizes = [64, 4096, 65536, 1 << 20]
connections, pingpongs = 2000, 5000

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return port

def receive_exactly(conn, count):
    data = bytearray()
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk: break
        data += chunk
    return data

echo_port = free_port()
echo = socket.socket(); echo.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
echo.bind(("127.0.0.1", echo_port)); echo.listen(256)

def serve_one(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        chunk = conn.recv(1 << 20)
        if not chunk: break
        conn.sendall(chunk)
    conn.close()

def serve():
    while True:
        conn, _ = echo.accept()
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()
threading.Thread(target=serve, daemon=True).start()

binary = subprocess.run(["swift", "build", "-c", "release", "--show-bin-path"], capture_output=True, text=True,
                        check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip() + "/sameport"

def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def start_relay(flags):
    port = free_port()
    relay = subprocess.Popen([binary, "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{echo_port}",
                              "--log-level", "warning"] + flags)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port)).close(); break
        except OSError:
            time.sleep(0.02)
    return relay, port

slow = []  # connections that took over a second (a lost event waits for a timer)

def run_connections(port, payload, count):
    for _ in range(count):
        start = time.perf_counter()
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(payload); c.shutdown(socket.SHUT_WR)
        if len(receive_exactly(c, len(payload) + 1)) != len(payload): raise SystemExit("short echo")
        c.close()
        if time.perf_counter() - start > 1: slow.append(time.perf_counter() - start)

def run_pingpong(port, payload, count):
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(count):
        c.sendall(payload)
        if len(receive_exactly(c, len(payload))) != len(payload): raise SystemExit("short echo")
    c.close()

flag_sets = [["--splice", "on"], ["--splice", "off"]] + ([extra] if extra else [])
results = {}  # (flags, mode, size) -> [(cpu, wall)]
for _ in range(rounds):
    for flags in flag_sets:
        relay, port = start_relay(flags)
        for size in sizes:
            payload = os.urandom(size)
            # 1 MiB payloads: a sixteenth of the count, to keep the run short.
            scale = 16 if size >= 1 << 20 else 1
            for mode, body, count in [("connections", run_connections, connections // scale),
                                      ("ping-pong", run_pingpong, pingpongs // scale)]:
                time.sleep(0.2)
                cpu, wall = cpu_seconds(relay.pid), time.perf_counter()
                body(port, payload, count)
                results.setdefault((" ".join(flags), mode, size), []).append(
                    ((cpu_seconds(relay.pid) - cpu) / count, (time.perf_counter() - wall) / count))
        relay.terminate(); relay.wait(10)

print(f"{rounds} rounds; relay CPU and wall time per connection (or round trip), medians")
for mode in ["connections", "ping-pong"]:
    for size in sizes:
        cells = []
        for flags in flag_sets:
            samples = results[(" ".join(flags), mode, size)]
            cpu = statistics.median(s[0] for s in samples) * 1e6
            wall = statistics.median(s[1] for s in samples) * 1e6
            cells.append(f"{' '.join(flags)}: cpu {cpu:7.1f} us, wall {wall:7.1f} us")
        print(f"{mode:11s} {size:>8d} B | " + " | ".join(cells))
if slow:
    print(f"{len(slow)} connection(s) took over 1 s: {' '.join(f'{x:.1f}s' for x in slow)}")
