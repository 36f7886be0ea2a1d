#!/usr/bin/env python3
"""One-stream throughput through sameport, side by side with a direct connection, in one run.

    ./scripts/throughput.py [--size-mib 1024] [--runs 3] [-- EXTRA SAMEPORT FLAGS]

Builds nothing: run `swift build -c release` first (scripts/demo.sh does). A sink on 127.0.0.1
counts the bytes; the sender writes SIZE MiB and half-closes; each run is timed until the sink has
everything. Prints GB/s for direct and relayed runs (alternating), the ratio of medians, and the
relay's CPU seconds per GiB and peak RSS. Loopback only. Not a test: numbers depend on the machine.
"""
import os, socket, statistics, subprocess, sys, threading, time

args = sys.argv[1:]
extra = args[args.index("--") + 1:] if "--" in args else []
args = args[: args.index("--")] if "--" in args else args
size = int(args[args.index("--size-mib") + 1]) << 20 if "--size-mib" in args else 1 << 30
runs = int(args[args.index("--runs") + 1]) if "--runs" in args else 3
chunk = 1 << 20

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return port

sink_port, relay_port = free_port(), free_port()
sink = socket.socket(); sink.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sink.bind(("127.0.0.1", sink_port)); sink.listen(16)

def serve():
    while True:
        conn, _ = sink.accept()
        buf = bytearray(chunk)
        while conn.recv_into(buf):
            pass
        conn.sendall(b"!"); conn.close()
threading.Thread(target=serve, daemon=True).start()

binary = subprocess.run(["swift", "build", "-c", "release", "--show-bin-path"], capture_output=True,
                        text=True, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip() + "/sameport"
relay = subprocess.Popen([binary, "--listen", f"127.0.0.1:{relay_port}", "--upstream", f"127.0.0.1:{sink_port}",
                          "--log-level", "warning"] + extra)
for _ in range(200):
    try:
        socket.create_connection(("127.0.0.1", relay_port)).close(); break
    except OSError:
        time.sleep(0.02)

data = os.urandom(chunk)
def once(port):
    c = socket.create_connection(("127.0.0.1", port))
    start = time.perf_counter()
    for _ in range(size // chunk):
        c.sendall(data)
    c.shutdown(socket.SHUT_WR); c.recv(1)
    elapsed = time.perf_counter() - start
    c.close()
    return size / elapsed / 1e9

def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

direct, relayed = [], []
cpu_before = cpu_seconds(relay.pid)
for _ in range(runs):
    direct.append(once(sink_port))
    relayed.append(once(relay_port))
cpu = cpu_seconds(relay.pid) - cpu_before
peak = next(line.split()[1] for line in open(f"/proc/{relay.pid}/status") if line.startswith("VmHWM"))
relay.terminate(); relay.wait(10)
print(f"size {size >> 20} MiB, {runs} runs, sameport flags: {' '.join(extra) or '(defaults)'}")
print(f"direct    {' '.join(f'{x:.2f}' for x in direct)} GB/s, median {statistics.median(direct):.2f}")
print(f"sameport  {' '.join(f'{x:.2f}' for x in relayed)} GB/s, median {statistics.median(relayed):.2f}")
print(f"ratio     {statistics.median(relayed) / statistics.median(direct):.2f}x direct")
print(f"relay CPU {cpu / (runs * size / (1 << 30)):.2f} s per GiB, peak RSS {peak} KiB")
