#!/usr/bin/env python3
"""Soak sameport under connection churn and reload storms; fails on any crash, failure or stall.

    ./scripts/soak.py [--bin PATH] [--connections N] [--ephemeral N] [--nofile 1024]
                      [--reload-seconds S] [--round-seconds S] [--no-vanished] [--ci]

Loopback (127.0.0.1) only. Compiles scripts/bench_load.c (gcc) into a temporary directory and
uses it as the upstream (16 ports) and as the load: 8 clients, each looping connect, send one
byte, read the upstream's one-byte answer, and EOF: the UPSTREAM closes first, as in bench.py's
conn/s figure.

churn     rounds of --round-seconds, each with a fresh relay (fixed-port egress, 16 upstreams),
          until --connections have been served; then the same with --egress ephemeral for
          --ephemeral connections. Each round must have: no failed connection, no connection
          taking 100 ms or more, the relay alive and exiting 0 on SIGTERM, its descriptors back
          to their baseline after the round, and, sampled every few milliseconds during it, never
          more descriptors than 8 clients' connections can hold (2 sockets and 2 pipes of 2
          descriptors each) plus a small constant. --nofile runs the relay under that soft and
          hard limit (prlimit), as a service with the common limit of 1,024 would.
reload    for --reload-seconds: transfers of 1 KiB to 2 MiB echoed through a kept relay with
          SHA-256 checked, by 4 clients, while a SIGHUP arrives every 10 ms and the file
          alternates between a version with a second relay and one without it. Every transfer
          must arrive whole and in order; the relay must not crash and must exit 0.
vanished  (root, nft; about 5 s) in a network namespace of its own: a relay with 4 upstreams
          and short keepalive (1s + 1s x 2) holds 4 clients, one per upstream; nftables then
          drops everything to and from one client's address and from the upstream on 127.0.0.5
          (whose client stays). The pairs they held must come back: that client is reset, a
          queued client is served, the two other connections go on, and afterwards 4 fresh
          clients are served at once; each vanished connection is logged "Connection timed out";
          no descriptor is left behind; exit 0. The namespace is removed whatever happens.
          --no-vanished skips it.

--ci: 50,000 fixed-port connections, 20,000 ephemeral, the first round under --nofile 1024, a
5-second reload storm, and the vanished-peer round. Exit status 0 only if every check passed; the last line is
'N passed, N failed'.
"""
import argparse
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
CLIENTS = 8
UPSTREAMS = 16
STALL_MS = 100.0
# Per open connection: client and upstream sockets, and two pipes of two descriptors each.
FDS_PER_CONNECTION = 6
FD_SLACK = 16

processes = []


def stop_all():
    for proc in processes:
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def listening(port):
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


def free_ports(count, start):
    """`count` consecutive ports below 32768 (the ephemeral range) that nothing listens on."""
    port = start
    while port + count < 32768:
        if not any(listening(p) for p in range(port, port + count)):
            return list(range(port, port + count))
        port += count
    raise RuntimeError("no free ports")


def start(argv, log):
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    processes.append(proc)
    return proc


def wait_listening(proc, port, what, logpath, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {tail(logpath)}")
        if listening(port):
            return
        time.sleep(0.01)
    raise RuntimeError(f"{what} is not listening on {HOST}:{port} after {timeout:.0f} s")


def tail(path, size=1500):
    with open(path, errors="replace") as f:
        return f.read()[-size:]


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok, what):
        if ok:
            self.passed += 1
            print(f"PASS: {what}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL: {what}", flush=True)
        return ok


def stop_relay(proc, timeout=40):
    if proc.poll() is not None:
        return proc.returncode
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def churn_round(args, tools, checks, label, ports, egress, seconds, nofile, workdir):
    listen = ports["listen"]
    argv = [args.bin, "--listen", f"{HOST}:{listen}", "--log-level", "warning",
            "--max-connections", "4096", "--egress", egress]
    for port in ports["upstreams"]:
        argv += ["--upstream", f"{HOST}:{port}"]
    if nofile:
        argv = ["prlimit", f"--nofile={nofile}:{nofile}", "--"] + argv
    logpath = os.path.join(workdir, f"relay-{label}.log")
    with open(logpath, "w") as log:
        relay = start(argv, log)
    wait_listening(relay, listen, "sameport", logpath)
    # Warm: threads, timers and the allocator, before the baseline is read.
    warm = subprocess.run([tools["load"], "connrate", str(listen), "1", "0", "0.2"],
                          capture_output=True, text=True, timeout=30)
    time.sleep(0.2)
    baseline_fds, baseline_rss = fd_count(relay.pid), rss_kib(relay.pid)
    peak = [baseline_fds]
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            count = fd_count(relay.pid)
            if count > peak[0]:
                peak[0] = count
            time.sleep(0.003)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = subprocess.run([tools["load"], "connrate", str(listen), str(CLIENTS), "0", str(seconds)],
                                capture_output=True, text=True, timeout=seconds + 30)
        output = result.stdout.split()
    except subprocess.TimeoutExpired:
        output = []
    sampling.set()
    sampler.join()
    alive = relay.poll() is None
    rate = completed = failed = 0
    slowest = float("inf")
    if len(output) == 5:
        rate, completed, failed = float(output[0]), int(output[1]), int(output[2])
        slowest = float(output[4])
    settled = False
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and alive:
        if fd_count(relay.pid) == baseline_fds:
            settled = True
            break
        time.sleep(0.02)
    end_fds, end_rss = fd_count(relay.pid), rss_kib(relay.pid)
    bound = baseline_fds + CLIENTS * FDS_PER_CONNECTION + FD_SLACK
    status = stop_relay(relay)
    print(f"{label}: {completed} connections at {rate:.0f}/s, {failed} failed, slowest {slowest:.1f} ms; "
          f"fds {baseline_fds} -> peak {peak[0]} -> {end_fds}; RSS {baseline_rss} -> {end_rss} KiB; exit {status}",
          flush=True)
    if warm.returncode != 0 or not alive or status != 0:
        print(tail(logpath), flush=True)
    checks.check(len(output) == 5, f"{label}: the load ran to its end (no connection hung)")
    checks.check(alive, f"{label}: the relay did not crash")
    checks.check(failed == 0, f"{label}: no failed connection ({failed})")
    checks.check(slowest < STALL_MS, f"{label}: no connection took {STALL_MS:.0f} ms or more (slowest {slowest:.1f} ms)")
    checks.check(peak[0] <= bound, f"{label}: descriptors never above {bound} (peak {peak[0]})")
    checks.check(settled, f"{label}: descriptors back to the baseline {baseline_fds} (now {end_fds})")
    checks.check(status == 0, f"{label}: exit status 0 on SIGTERM ({status})")
    return completed


def churn(args, tools, checks, egress, target, nofile_first, workdir):
    served = 0
    round_number = 0
    while served < target:
        round_number += 1
        label = f"{egress} round {round_number}"
        nofile = args.nofile if (nofile_first and round_number == 1) else None
        if nofile:
            label += f" (nofile {nofile})"
        completed = churn_round(args, tools, checks, label, args.ports, egress, args.round_seconds, nofile, workdir)
        if completed == 0:
            break
        served += completed
    checks.check(served >= target, f"{egress}: {served} connections served (target {target})")


CONFIG_ONE = """[[relay]]
name = "kept"
listen = "127.0.0.1:{kept}"
upstream = "127.0.0.1:{echo}"
egress = "ephemeral"
"""
CONFIG_TWO = CONFIG_ONE + """
[[relay]]
name = "toggled"
listen = "127.0.0.1:{toggled}"
upstream = "127.0.0.1:{echo}"
"""


def reload_storm(args, tools, checks, workdir):
    kept, toggled = args.ports["listen"], args.ports["listen"] + 1
    echo = args.ports["upstreams"][0]
    path = os.path.join(workdir, "reload.toml")
    versions = [CONFIG_ONE.format(kept=kept, echo=echo), CONFIG_TWO.format(kept=kept, toggled=toggled, echo=echo)]
    with open(path, "w") as f:
        f.write(versions[0])
    logpath = os.path.join(workdir, "relay-reload.log")
    with open(logpath, "w") as log:
        relay = start([args.bin, "--config", path, "--log-level", "warning"], log)
    wait_listening(relay, kept, "sameport", logpath)
    stop = threading.Event()
    results = {"ok": 0, "bad": 0, "errors": []}
    lock = threading.Lock()

    def client(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            size = rng.randint(1024, 2 << 20)
            payload = rng.randbytes(size)
            try:
                with socket.create_connection((HOST, kept), timeout=10) as s:
                    s.settimeout(10)
                    s.sendall(b"E")
                    sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
                    sender.start()
                    digest = hashlib.sha256()
                    received = 0
                    while True:
                        chunk = s.recv(1 << 20)
                        if not chunk:
                            break
                        digest.update(chunk)
                        received += len(chunk)
                    sender.join()
                ok = received == size + 1 and digest.digest() == hashlib.sha256(b"E" + payload).digest()
            except OSError as error:
                ok = False
                with lock:
                    results["errors"].append(str(error))
            with lock:
                results["ok" if ok else "bad"] += 1

    clients = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(4)]
    for thread in clients:
        thread.start()
    started = time.monotonic()
    deadline = started + args.reload_seconds
    reloads = 0
    while time.monotonic() < deadline and relay.poll() is None:
        with open(path + ".new", "w") as f:
            f.write(versions[(reloads + 1) % 2])
        os.replace(path + ".new", path)
        os.kill(relay.pid, signal.SIGHUP)
        reloads += 1
        # Every 10 ms on the clock, however long the write took.
        time.sleep(max(0.0, started + reloads * 0.01 - time.monotonic()))
    stop.set()
    for thread in clients:
        thread.join(timeout=60)
    alive = relay.poll() is None
    rss = rss_kib(relay.pid)
    status = stop_relay(relay)
    print(f"reload storm: {reloads} SIGHUPs, {results['ok']} transfers verified, {results['bad']} bad "
          f"{results['errors'][:3]}; RSS {rss} KiB; exit {status}", flush=True)
    if not alive or status != 0:
        print(tail(logpath), flush=True)
    checks.check(alive, "reload storm: the relay did not crash")
    checks.check(results["bad"] == 0 and results["ok"] > 0, f"reload storm: every transfer arrived whole ({results['ok']} ok, {results['bad']} bad)")
    checks.check(status == 0, f"reload storm: exit status 0 on SIGTERM ({status})")


VANISH_UPSTREAMS = [("127.0.0.1", 9000), ("127.0.0.1", 9001), ("127.0.0.5", 9000), ("127.0.0.6", 9000)]
VANISH_LISTEN = ("127.0.0.1", 7000)
VANISH_TIMEOUT = 10.0


def vanished_round(args, checks, workdir):
    """Runs `vanished_inner` in a network namespace made for it, and counts its PASS/FAIL lines."""
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"):
        print("SKIP: vanished peers: needs root, ip and nft (apt-get install nftables)", flush=True)
        return
    name = f"sameport-soak-{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        try:
            inner = subprocess.run(
                ["ip", "netns", "exec", name, sys.executable, os.path.abspath(__file__), "--vanished-inner",
                 "--bin", args.bin, "--workdir", workdir],
                capture_output=True, text=True, timeout=90)
            output = inner.stdout + inner.stderr
        except subprocess.TimeoutExpired as error:
            output = (error.stdout or b"").decode(errors="replace") + "\nFAIL: vanished: timed out after 90 s"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    results = [line for line in output.splitlines() if line.startswith(("PASS: ", "FAIL: "))]
    for line in output.splitlines():
        if not line.startswith(("PASS: ", "FAIL: ")):
            print(line, flush=True)
    for line in results:
        checks.check(line.startswith("PASS: "), line[6:])
    checks.check(bool(results), "vanished: the round ran")


def tagged_server(host, port, stop):
    """An upstream that says which it is (`host:port` and a newline) on accept, then echoes."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(64)
    listener.settimeout(0.1)

    def serve(conn):
        with conn:
            conn.settimeout(60)
            try:
                conn.sendall(f"{host}:{port}\n".encode())
                while not stop.is_set():
                    data = conn.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)
            except OSError:
                pass

    def accept():
        with listener:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    break
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


class Client:
    """A client of the relay from `source`: learns its upstream from the tag line."""

    def __init__(self, source, timeout=VANISH_TIMEOUT):
        self.sock = socket.socket()
        self.sock.settimeout(timeout)
        self.sock.bind((source, 0))
        self.sock.connect(VANISH_LISTEN)
        self.upstream = self.readline()

    def readline(self):
        line = b""
        while not line.endswith(b"\n"):
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("EOF before the tag line")
            line += chunk
        return line.decode().strip()

    def echo(self, data):
        self.sock.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = self.sock.recv(len(data) - len(got))
            if not chunk:
                raise ConnectionError("EOF")
            got += chunk
        return got == data

    def ended_by_reset(self, timeout):
        """True when the relay resets the connection within `timeout` (not EOF, data or silence)."""
        self.sock.settimeout(timeout)
        try:
            self.sock.recv(1)
        except ConnectionResetError:
            return True
        except OSError:
            pass
        return False

    def close(self):
        self.sock.close()


def nft(command):
    subprocess.run(["nft", command], check=True)


def vanished_inner(args):
    """The vanished-peer round, inside its namespace (see the module's doc)."""
    checks = Checks()
    stop = threading.Event()
    for host, port in VANISH_UPSTREAMS:
        tagged_server(host, port, stop)
    logpath = os.path.join(args.workdir, "relay-vanished.log")
    argv = [args.bin, "--listen", "%s:%d" % VANISH_LISTEN, "--connect-timeout", "15s",
            "--keepalive", "1s", "--keepalive-interval", "1s", "--keepalive-count", "2"]
    for host, port in VANISH_UPSTREAMS:
        argv += ["--upstream", f"{host}:{port}"]
    with open(logpath, "w") as log:
        relay = start(argv, log)
    try:
        wait_listening(relay, VANISH_LISTEN[1], "sameport", logpath)
        # Warm (the shards' lazily made descriptors), then read the baseline once its line is out.
        warm = Client("127.0.0.7")
        warm.echo(b"warm")
        warm.close()
        deadline = time.monotonic() + VANISH_TIMEOUT
        while time.monotonic() < deadline and "client=127.0.0.7:" not in tail(logpath, 100_000):
            time.sleep(0.01)
        baseline = fd_count(relay.pid)
        held = [Client(source) for source in ["127.0.0.2", "127.0.0.3", "127.0.0.8", "127.0.0.9"]]
        checks.check(all(client.echo(b"x") for client in held) and len({c.upstream for c in held}) == 4,
                     f"vanished: 4 held clients, one per upstream ({[c.upstream for c in held]})")
        # One client vanishes (its upstream is on 127.0.0.1), and one upstream (127.0.0.5) under a
        # client that stays; the other two connections must go on.
        gone = next(c for c in held if c.upstream.startswith("127.0.0.1:"))
        orphan = next(c for c in held if c.upstream.startswith("127.0.0.5:"))
        doomed = [gone, orphan]
        living = [c for c in held if c not in doomed]
        source = gone.sock.getsockname()[0]
        nft("add table ip vanish_clients; add chain ip vanish_clients input { type filter hook input priority 0; }; "
            f"add rule ip vanish_clients input ip saddr {source} drop; add rule ip vanish_clients input ip daddr {source} drop")
        nft("add table ip vanish_upstreams; add chain ip vanish_upstreams input { type filter hook input priority 0; }; "
            "add rule ip vanish_upstreams input ip saddr 127.0.0.5 drop; add rule ip vanish_upstreams input ip daddr 127.0.0.5 drop")
        started = time.monotonic()
        # The live client of the vanished upstream is reset once the relay's keepalive gives up.
        checks.check(orphan.ended_by_reset(VANISH_TIMEOUT),
                     f"vanished: the live client of a vanished upstream was reset ({time.monotonic() - started:.1f} s)")
        # The upstream comes back (a NAT mapping made anew); the vanished client stays gone.
        nft("delete table ip vanish_upstreams")
        late = Client("127.0.0.4")
        served = late.echo(b"late")
        elapsed = time.monotonic() - started
        checks.check(served and elapsed < 8, f"vanished: a queued client was served {elapsed:.1f} s after the drop")
        checks.check(all(c.echo(b"still") for c in living), f"vanished: the {len(living)} connection(s) of live peers went on")
        for client in held + [late]:
            client.close()
        fresh = [Client("127.0.0.6") for _ in range(4)]
        checks.check(all(c.echo(b"fresh") for c in fresh) and len({c.upstream for c in fresh}) == 4,
                     "vanished: every pair came back: 4 fresh clients served at once")
        for client in fresh:
            client.close()
        deadline = time.monotonic() + 10
        timed_out = []
        while time.monotonic() < deadline:
            timed_out = [line for line in open(logpath, errors="replace") if "Connection timed out" in line]
            if len(timed_out) >= len(doomed) and fd_count(relay.pid) == baseline:
                break
            time.sleep(0.05)
        checks.check(len(timed_out) == len(doomed), f"vanished: {len(timed_out)} connection(s) logged 'Connection timed out', {len(doomed)} vanished")
        checks.check(fd_count(relay.pid) == baseline, f"vanished: descriptors back to {baseline} ({fd_count(relay.pid)})")
        alive = relay.poll() is None
        status = stop_relay(relay)
        checks.check(alive and status == 0, f"vanished: the relay did not crash and exited 0 ({status})")
        if not (alive and status == 0):
            print(tail(logpath), flush=True)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        checks.check(False, f"vanished: {error}")
        print(tail(logpath), flush=True)
    finally:
        stop.set()
        stop_all()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", help="the sameport binary (default: build the release one)")
    parser.add_argument("--connections", type=int, default=300_000, help="fixed-port connections to serve (default 300,000)")
    parser.add_argument("--ephemeral", type=int, default=100_000, help="--egress ephemeral connections (default 100,000)")
    parser.add_argument("--round-seconds", type=float, default=5.0, help="length of a churn round, each with a fresh relay")
    parser.add_argument("--nofile", type=int, default=1024, help="descriptor limit of the first fixed-port round (0: none)")
    parser.add_argument("--reload-seconds", type=float, default=20.0, help="length of the reload storm (0: skip)")
    parser.add_argument("--no-vanished", action="store_true", help="skip the vanished-peer round")
    parser.add_argument("--ci", action="store_true", help="the shorter run the test suite makes")
    parser.add_argument("--vanished-inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vanished_inner:
        vanished_inner(args)
        return
    if args.ci:
        args.connections, args.ephemeral, args.reload_seconds, args.round_seconds = 50_000, 20_000, 5.0, 4.0
    if not args.bin:
        subprocess.run(["swift", "build", "-c", "release", "--product", "sameport"], cwd=ROOT, check=True)
        args.bin = os.path.join(ROOT, ".build", "release", "sameport")
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        sys.exit("soak: gcc not found: apt-get install gcc")
    workdir = tempfile.mkdtemp(prefix="sameport-soak.")
    checks = Checks()
    try:
        load = os.path.join(workdir, "bench_load")
        subprocess.run([gcc, "-O2", "-pthread", "-o", load, os.path.join(ROOT, "scripts", "bench_load.c")], check=True)
        tools = {"load": load}
        ports = free_ports(UPSTREAMS + 2, 23000)
        args.ports = {"upstreams": ports[:UPSTREAMS], "listen": ports[UPSTREAMS]}
        serverlog = os.path.join(workdir, "server.log")
        with open(serverlog, "w") as log:
            server = start([load, "server", "2", f"{ports[0]}-{ports[UPSTREAMS - 1]}"], log)
        wait_listening(server, ports[UPSTREAMS - 1], "bench_load server", serverlog)
        churn(args, tools, checks, "same-port", args.connections, args.nofile > 0, workdir)
        if args.ephemeral > 0:
            churn(args, tools, checks, "ephemeral", args.ephemeral, False, workdir)
        if args.reload_seconds > 0:
            reload_storm(args, tools, checks, workdir)
        if not args.no_vanished:
            vanished_round(args, checks, workdir)
    finally:
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{checks.passed} passed, {checks.failed} failed")
    sys.exit(0 if checks.failed == 0 and checks.passed > 0 else 1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
