#!/usr/bin/env python3
"""sameport side by side with direct connections and the other TCP relays, in one run.

    ./scripts/bench.py [--reps 3] [--quick|--smoke] [--no-install] [--bin PATH] [--configs a,b,...]

Installs what it needs with apt-get (iperf3, socat, haproxy, nginx with its stream module, gcc;
systemd-socket-proxyd comes with systemd) unless --no-install or --quick, builds sameport in release
mode unless --bin is given, compiles its C load generator (scripts/bench_load.c) into a temporary
directory, and measures, on 127.0.0.1 only, each configuration:

  direct            the client talks to the upstream server itself
  sameport          sameport with its default egress: every upstream socket bound to the
                    listening 127.0.0.1:P (the 4-tuple rule: one connection per upstream port)
  sameport-eph      sameport --egress ephemeral (kernel-chosen source port)
  sameport-t1       sameport as above with --threads 1: one event loop, what the second core buys
  socat             socat TCP4-LISTEN:P,fork,reuseaddr TCP4:upstream
  haproxy           HAProxy, mode tcp, one frontend and one server
  nginx             nginx stream module, proxy_pass (its default proxy_half_close off: when one
                    side closes, nginx closes both; a client that half-closes loses its answer)
  nginx-hc          the same with proxy_half_close on: a half-closed connection stays open, as in
                    sameport and HAProxy, so it does the same work per connection (it waits for
                    and reads the client's FIN after the upstream's)
  proxyd            systemd-socket-proxyd under systemd-socket-activate

Metrics, each next to direct measured in the same run (see README.md, "Benchmark"):
  iperf3 up/down    one iperf3 stream, client -> upstream and (-R) upstream -> client. iperf3
                    opens a control and a data connection to the same upstream, which the
                    fixed-port relay cannot carry at once (4-tuple rule): n/a for sameport.
  bulk up/down      one connection of our own moving BYTES one way, timed to the last byte.
  CPU s/GiB         user+system CPU seconds of the relay's processes during the bulk transfers,
                    per GiB relayed.
  p50/p99           64-byte ping-pong on one connection to an echo upstream: added microseconds
                    over direct (absolute round trip in brackets). Client, upstream and relay are
                    pinned to one CPU (--pin-cpu): on this kind of VM a wake-up on the other CPU
                    costs ~20 us and lands at random, which would swamp what the relay adds.
  conn/s c=1, c=8   new connections per second with 1 and 8 concurrent clients, each sending one
                    byte and reading one byte; the UPSTREAM closes first. The fixed-port relay
                    gets --fixed-ports upstream ports (default 16) so that 8 clients never wait
                    for a free (127.0.0.1:P, upstream) pair.
  CPU µs/conn       user+system CPU microseconds of the relay's processes per connection in the
                    c=8 window: what a connection costs the relay itself. conn/s is shared out
                    between clients, upstream and relay on one machine's CPUs, so two relays
                    that differ in cost can reach the same rate; this column tells them apart.
  conn/s 1 upstr.   new connections per second with 1 client and ONE upstream port: the client
                    reconnects as soon as it sees EOF, so the fixed-port relay must hand the one
                    (127.0.0.1:P, upstream) pair over from each connection to the next (the
                    product's core case: a partner that admits one source port).
  sporadic p50      one client, one connection at a time, each after a 20 ms pause (as conn/s:
                    one byte each way, the upstream closes first): microseconds a connection
                    takes beyond direct's, at the median. A relay that has gone quiet since
                    its last event must wake up for each, as between a partner's occasional
                    connections.
  KiB/idle conn     growth of the relay's memory (sum of PSS over its processes, which is the RSS
                    growth for a single process) with IDLE connections open, each after one
                    1-byte exchange, divided by their number. The fixed-port relay gets IDLE
                    upstream ports, one per connection.

A sameport connection that fails, or takes 100 ms or more, in the conn/s and sporadic runs, and a
sameport measurement that fails, fail the run (exit status 1, listed under the table as FAILED).

--quick (or --smoke): 256 MiB, 2,000 ping-pongs, 0.5 s of connections, 100 idle connections, one
repetition, nothing installed: half a minute, to see that everything runs.

Each repetition takes the measurements one after another, and every configuration goes through a
measurement before the next one starts, in alternating order (forward, then reversed), so that
the figures a column compares are taken minutes apart at most; the table shows the medians over
--reps repetitions. Under the table, sameport against the best peer of each repetition: the
median over repetitions of its conn/s divided by the best peer's, its CPU per connection divided by
the cheapest peer's, and its ping-pong round trip and sporadic connection time minus the best
peer's, the per-repetition figures with it. Every
process started is stopped by its PID (process group) on exit, Ctrl-C included. Not a test:
numbers depend on the machine and on what else runs on it.
"""
import argparse
import atexit
import ctypes
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
GIB = 1 << 30
PROXYD = "/lib/systemd/systemd-socket-proxyd"
SS = shutil.which("ss")
NGINX_MODULES = ["/usr/lib/nginx/modules/ngx_stream_module.so", "/usr/share/nginx/modules/ngx_stream_module.so"]

CONFIGS = ["direct", "sameport", "sameport-eph", "sameport-t1", "socat", "haproxy", "nginx", "nginx-hc", "proxyd"]
SAMEPORT = ("sameport", "sameport-eph", "sameport-t1")
PEERS = tuple(c for c in CONFIGS if c != "direct" and c not in SAMEPORT)
# A sameport connection slower than this fails the run, as a failed one does.
STALL_MS = 100.0
# The pause before each connection of the sporadic column: longer than a relay's wait for more
# events after its last one (sameport's linger: 1 ms by default).
SPORADIC_GAP_US = 20000
LABELS = {
    "direct": "direct (no relay)",
    "sameport": "sameport (same-port egress)",
    "sameport-eph": "sameport --egress ephemeral",
    "sameport-t1": "sameport --threads 1",
    "socat": "socat",
    "haproxy": "HAProxy (mode tcp)",
    "nginx": "nginx stream",
    "nginx-hc": "nginx stream, proxy_half_close on",
    "proxyd": "systemd-socket-proxyd",
}


def log(message):
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ processes

_started = []  # every Popen this script started, stopped at exit


def _die_with_parent():
    """In the child before exec: no blocked signals and default stop signals (a test runner may
    start this script with SIGTERM blocked, and socat and systemd-socket-proxyd would inherit
    that), and SIGKILL when this script dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def spawn(argv, logfile, **kwargs):
    """Starts argv in its own process group, output to logfile."""
    out = open(logfile, "ab")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent, **kwargs)
    finally:
        out.close()
    proc.logfile = logfile
    _started.append(proc)
    return proc


def stop(proc, timeout=5.0):
    """SIGTERM to the process group we created, then SIGKILL; reaps the leader."""
    if proc in _started:
        _started.remove(proc)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
            # the leader is gone; make sure nothing of its group (forked children) survives
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        except subprocess.TimeoutExpired:
            if sig == signal.SIGTERM:
                log(f"bench: {os.path.basename(proc.args[0])} (pid {proc.pid}) did not stop within {timeout:g} s "
                    "of SIGTERM; killing it")


def stop_all():
    for proc in list(_started):
        stop(proc, timeout=2.0)


def on_signal(signum, _frame):
    raise SystemExit(128 + signum)


# ------------------------------------------------------------------------------- /proc helpers

def children_map():
    kids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid):
    kids, tree, todo = children_map(), [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(kids.get(p, []))
    return tree


def cpu_seconds(pid):
    """utime+stime of every process in the tree, plus what each has reaped (cutime+cstime)."""
    ticks = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += sum(int(x) for x in fields[11:15])
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_kib(pid):
    """Sum of PSS over the process tree (for one process: its RSS less a share of shared pages)."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def set_affinity(pid, cpus):
    """Moves every thread of every process in the tree to `cpus`."""
    for p in process_tree(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                os.sched_setaffinity(int(task), cpus)
            except OSError:
                pass


def listening(port):
    """True when some socket listens on 127.0.0.1:port or *:port. Asks the kernel through `ss`
    (netlink, listening sockets only) when it is there: /proc/net/tcp also lists every TIME_WAIT
    socket, tens of thousands after a connection-rate run, and reading it takes a third of a second."""
    if SS:
        out = subprocess.run([SS, "-Hltn", f"sport = :{port}"], stdin=subprocess.DEVNULL, capture_output=True,
                             text=True).stdout
        return any(f"127.0.0.1:{port}" in line or f"*:{port}" in line or f"0.0.0.0:{port}" in line
                   for line in out.splitlines())
    want = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    with open("/proc/net/tcp") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 3 and parts[1] in want and parts[3] == "0A":
                return True
    return False


def port_free(port):
    s = socket.socket()
    try:
        s.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_block(count, start, stop_at):
    """The first port of `count` consecutive free ports in [start, stop_at)."""
    base = start
    while base + count <= stop_at:
        for offset in range(count):
            if not port_free(base + offset):
                base += offset + 1
                break
        else:
            return base
    raise SystemExit(f"bench: no {count} consecutive free ports between {start} and {stop_at}")


class PortPool:
    """Fresh listen ports for the relays (below the ephemeral range), never the same twice."""

    def __init__(self, start, stop_at, avoid):
        self.next, self.stop_at, self.avoid = start, stop_at, avoid

    def take(self):
        while self.next < self.stop_at:
            port = self.next
            self.next += 1
            if port not in self.avoid and port_free(port):
                return port
        raise SystemExit("bench: out of free listen ports")


# ------------------------------------------------------------------------------------ installing

def run_quiet(argv, **kwargs):
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kwargs)


def apt_install(packages):
    """apt-get install -y, with apt-get update first if that fails; True on success."""
    sudo = [] if os.geteuid() == 0 else (["sudo"] if shutil.which("sudo") else [])
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = "/usr/sbin/policy-rc.d"
    made_policy = False
    if os.geteuid() == 0 and not os.path.exists(policy):
        # Keep the packages' own services (nginx on :80, haproxy) from starting during the install.
        with open(policy, "w") as f:
            f.write("#!/bin/sh\n# written by sameport scripts/bench.py during apt-get install\nexit 101\n")
        os.chmod(policy, 0o755)
        made_policy = True
    try:
        log(f"bench: installing {' '.join(packages)}")
        install = sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends"] + packages
        if run_quiet(install, env=env).returncode == 0:
            return True
        run_quiet(sudo + ["apt-get", "update", "-q"], env=env)
        result = run_quiet(install, env=env)
        if result.returncode != 0:
            log(f"bench: apt-get install {' '.join(packages)} failed:\n{result.stdout[-2000:]}")
        return result.returncode == 0
    finally:
        if made_policy:
            os.unlink(policy)


def nginx_stream():
    """(nginx binary, load_module line or '') when nginx has the stream module, else None."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not nginx:
        return None
    flags = run_quiet([nginx, "-V"]).stdout
    if "--with-stream" in flags and "--with-stream=dynamic" not in flags:
        return nginx, ""
    for module in NGINX_MODULES:
        if os.path.exists(module):
            return nginx, f"load_module {module};"
    return None


def find_tools(install):
    """What each peer needs, installed when missing and allowed. Returns (tools, notes)."""
    tools, notes = {}, []

    def need(name, find, packages):
        found = find()
        if not found and install and apt_install(packages):
            found = find()
        if not found:
            notes.append(f"{name}: not available ({'install failed' if install else 'not installed, --no-install'})")
        tools[name] = found

    need("gcc", lambda: shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
         or (os.path.exists("/opt/swift/usr/bin/clang") and "/opt/swift/usr/bin/clang"), ["gcc", "libc6-dev"])
    need("iperf3", lambda: shutil.which("iperf3"), ["iperf3"])
    need("socat", lambda: shutil.which("socat"), ["socat"])
    need("haproxy", lambda: shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy"),
         ["haproxy"])
    need("nginx", nginx_stream, ["nginx", "libnginx-mod-stream"])
    activate = shutil.which("systemd-socket-activate")
    tools["proxyd"] = (activate, PROXYD) if activate and os.path.exists(PROXYD) else None
    if not tools["proxyd"]:
        notes.append("systemd-socket-proxyd: not available (needs systemd's systemd-socket-activate and "
                     f"{PROXYD})")
    return tools, notes


def versions(tools, binary):
    def first_line(argv):
        try:
            out = run_quiet(argv, timeout=10).stdout.strip().splitlines()
            return out[0] if out else "?"
        except OSError:
            return "?"
    found = {"sameport": first_line([binary, "--version"]), "kernel": platform.release()}
    if tools.get("iperf3"):
        found["iperf3"] = first_line([tools["iperf3"], "--version"])
    if tools.get("socat"):
        found["socat"] = next((l for l in run_quiet([tools["socat"], "-V"]).stdout.splitlines()
                               if "socat version" in l), "?").strip()
    if tools.get("haproxy"):
        found["haproxy"] = first_line([tools["haproxy"], "-v"])
    if tools.get("nginx"):
        found["nginx"] = first_line([tools["nginx"][0], "-v"])
    if tools.get("proxyd"):
        found["systemd"] = first_line([tools["proxyd"][0], "--version"])
    return found


# --------------------------------------------------------------------------------------- relays

class Relay:
    """One running relay (or none, for direct): where clients connect, and its process."""

    def __init__(self, port, proc=None):
        self.port, self.proc = port, proc

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def cpu(self):
        return cpu_seconds(self.proc.pid) if self.proc else 0.0

    def memory(self):
        return memory_kib(self.proc.pid) if self.proc else 0

    def stop(self):
        if self.proc:
            stop(self.proc)


class Bench:
    def __init__(self, args, tools, binary, load, tmp):
        self.args, self.tools, self.binary, self.load, self.tmp = args, tools, binary, load, tmp
        quick = args.quick
        self.bulk_bytes = args.bulk_mib << 20
        self.iperf_bytes = args.iperf_mib << 20
        self.pings = 2000 if quick else 20000
        self.sporadic = (20 if quick else 200, SPORADIC_GAP_US)  # connections, microseconds apart
        self.rate_seconds = (0.1, 0.5) if quick else (0.5, 3.0)
        self.settle = 0.1 if quick else 0.3  # seconds for a relay's memory and children to settle
        self.idle = args.idle
        self.fixed_ports = args.fixed_ports
        span = max(self.idle, self.fixed_ports, 1)
        self.server_base = free_block(span, 20000, 32000)
        self.server_ports = list(range(self.server_base, self.server_base + span))
        avoid = set(self.server_ports)
        self.iperf_port = free_block(1, self.server_base + span, 32000) if tools.get("iperf3") else None
        if self.iperf_port:
            avoid.add(self.iperf_port)
        self.listen_ports = PortPool(10000, 19999, avoid)
        self.server = None
        self.iperf_server = None
        self.counter = 0
        self.notes = []  # what went wrong or slow, printed under the table
        self.failures = []  # what went wrong with sameport: fails the run
        self.rep = 0

    def note(self, message):
        log(f"bench: {message}")
        self.notes.append(f"rep {self.rep + 1}: {message}")

    def fail(self, message):
        log(f"bench: FAILED: {message}")
        self.failures.append(f"rep {self.rep + 1}: {message}")

    # upstream servers -------------------------------------------------------------------------

    def start_servers(self):
        ports = f"{self.server_ports[0]}-{self.server_ports[-1]}"
        self.server = spawn([self.load, "server", "2", ports], os.path.join(self.tmp, "server.log"))
        self.wait_listening(self.server, self.server_ports[-1], "bench_load server")
        if self.iperf_port:
            self.start_iperf_server()

    def start_iperf_server(self):
        if self.iperf_server:
            stop(self.iperf_server)
        self.iperf_server = spawn([self.tools["iperf3"], "-s", "-B", HOST, "-p", str(self.iperf_port)],
                                  os.path.join(self.tmp, "iperf3-server.log"))
        self.wait_listening(self.iperf_server, self.iperf_port, "iperf3 -s")

    @staticmethod
    def wait_listening(proc, port, what, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                with open(proc.logfile, errors="replace") as f:
                    raise RuntimeError(f"{what} exited with {proc.returncode}: {f.read()[-1500:]}")
            if listening(port):
                return
            time.sleep(0.01)
        raise RuntimeError(f"{what} is not listening on {HOST}:{port} after {timeout:.0f} s")

    # relays -----------------------------------------------------------------------------------

    def start(self, config, upstreams, warm=True):
        """Starts `config` relaying to 127.0.0.1:each of `upstreams` (peers use the first only);
        `warm` runs a few connections through it first (the upstream must be bench_load's)."""
        if config == "direct":
            return Relay(upstreams[0])
        port = self.listen_ports.take()
        self.counter += 1
        tag = f"{config}-{self.counter}"
        logfile = os.path.join(self.tmp, f"{tag}.log")
        listen, first = f"{HOST}:{port}", f"{HOST}:{upstreams[0]}"
        if config in SAMEPORT:
            argv = [self.binary, "--listen", listen, "--log-level", "warning", "--drain-timeout", "0",
                    "--max-connections", str(max(1024, self.idle + 64)), "--queue-limit", "1024"]
            for upstream in upstreams if config != "sameport-eph" else upstreams[:1]:
                argv += ["--upstream", f"{HOST}:{upstream}"]
            if config == "sameport-eph":
                argv += ["--egress", "ephemeral"]
            if config == "sameport-t1":
                argv += ["--threads", "1"]
            argv += shlex.split(self.args.sameport_flags or "")
        elif config == "socat":
            argv = [self.tools["socat"], f"TCP4-LISTEN:{port},bind={HOST},reuseaddr,fork,backlog=4096",
                    f"TCP4:{first}"]
        elif config == "haproxy":
            cfg = os.path.join(self.tmp, f"{tag}.cfg")
            with open(cfg, "w") as f:
                f.write(f"""global
    maxconn 4096
defaults
    mode tcp
    maxconn 4096
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend bench
    bind {listen}
    default_backend upstream
backend upstream
    server s1 {first}
""")
            argv = [self.tools["haproxy"], "-db", "-f", cfg]
        elif config in ("nginx", "nginx-hc"):
            nginx, load_module = self.tools["nginx"]
            prefix = os.path.join(self.tmp, tag)
            os.makedirs(prefix, exist_ok=True)
            cfg = os.path.join(prefix, "nginx.conf")
            with open(cfg, "w") as f:
                f.write(f"""{load_module}
daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile 16384;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
stream {{
    server {{
        listen {listen};
        proxy_pass {first};{" proxy_half_close on;" if config == "nginx-hc" else ""}
    }}
}}
""")
            argv = [nginx, "-p", prefix + "/", "-e", f"{prefix}/error.log", "-c", cfg]
        elif config == "proxyd":
            activate, proxyd = self.tools["proxyd"]
            argv = [activate, "-l", listen, proxyd, "--connections-max=20000", first]
        else:
            raise ValueError(config)
        proc = spawn(argv, logfile)
        relay = Relay(port, proc)
        try:
            self.wait_listening(proc, port, config)
            if warm:
                self.warm(relay)
        except BaseException:
            relay.stop()
            raise
        return relay

    def warm(self, relay, count=4):
        """A few short connections, so that lazily started parts (proxyd's exec, worker threads,
        allocator arenas) exist before anything is measured."""
        for _ in range(count):  # one at a time: the fixed-port relay may have one upstream port
            self.idle_connection(relay.port).close()
        time.sleep(self.settle)

    @staticmethod
    def idle_connection(port):
        s = socket.create_connection((HOST, port), timeout=10)
        s.sendall(b"I")
        if s.recv(1) != b"i":
            s.close()
            raise RuntimeError(f"no answer through 127.0.0.1:{port}")
        return s

    # metrics ----------------------------------------------------------------------------------

    def load_run(self, *argv, timeout=120, cpus=None, cpu_of=None):
        """Runs bench_load; its numbers. cpu_of=(relay, seconds): also the relay's CPU seconds from
        `seconds` after the start (a conn/s load's warm-up) to the end, appended."""
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        proc = subprocess.Popen([self.load, *map(str, argv)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=pin)
        try:
            if cpu_of:
                time.sleep(cpu_of[1])
                cpu0 = cpu_of[0].cpu()
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"bench_load {' '.join(map(str, argv))}: {err.strip()}")
        numbers = [float(x) for x in out.split()]
        return numbers + [cpu_of[0].cpu() - cpu0] if cpu_of else numbers

    def iperf(self, config):
        if not self.iperf_port or config in ("sameport", "sameport-t1"):
            return {}
        out = {}
        relay = self.start(config, [self.iperf_port], warm=False)
        try:
            for key, extra in (("iperf_up", []), ("iperf_down", ["-R"])):
                argv = [self.tools["iperf3"], "-c", HOST, "-p", str(relay.port), "-n", str(self.iperf_bytes),
                        "-J", *extra]
                try:
                    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                            timeout=120)
                    data = json.loads(result.stdout)
                    if "error" in data:
                        raise RuntimeError(data["error"])
                    out[key] = data["end"]["sum_received"]["bits_per_second"] / 1e9
                except (subprocess.TimeoutExpired, ValueError, KeyError, RuntimeError) as error:
                    self.note(f"{config}: iperf3 {' '.join(extra)} failed: {error}")
                    self.start_iperf_server()
        finally:
            relay.stop()
        return out

    def bulk(self, config):
        relay = self.start(config, self.server_ports[:1])
        try:
            cpu0 = relay.cpu()
            up = self.load_run("bulk", relay.port, "up", self.bulk_bytes)[0]
            down = self.load_run("bulk", relay.port, "down", self.bulk_bytes)[0]
            time.sleep(0.1)  # forked children (socat) exit and are reaped
            cpu = relay.cpu() - cpu0
        finally:
            relay.stop()
        out = {"bulk_up": self.bulk_bytes * 8 / up / 1e9, "bulk_down": self.bulk_bytes * 8 / down / 1e9}
        if config != "direct":
            out["cpu_per_gib"] = cpu / (2 * self.bulk_bytes / GIB)
        return out

    def pingpong(self, config):
        relay = self.start(config, self.server_ports[:1])
        cpus = {self.args.pin_cpu} if self.args.pin_cpu >= 0 else None
        try:
            if cpus:
                set_affinity(self.server.pid, cpus)
                if relay.proc:
                    set_affinity(relay.proc.pid, cpus)
            p50, p99, _ = self.load_run("pingpong", relay.port, self.pings, self.pings // 10, cpus=cpus)
        finally:
            if cpus:
                set_affinity(self.server.pid, os.sched_getaffinity(0))
            relay.stop()
        return {"p50": p50, "p99": p99}

    def sporadic_latency(self, config):
        relay = self.start(config, self.server_ports[:1])
        try:
            p50, p99, _, slowest = self.load_run("sporadic", relay.port, *self.sporadic)
        finally:
            relay.stop()
        # A stall here fails the run as it does in the conn/s runs.
        if config in SAMEPORT and slowest >= STALL_MS * 1000:
            self.fail(f"{config}: sporadic connections: the slowest took {slowest / 1000:.0f} ms")
        return {"sporadic_p50": p50, "sporadic_p99": p99}

    CONNRATE = {"conn1": (1, None), "conn8": (8, None), "conn1u": (1, 1)}

    def connrate(self, config, key):
        clients, ports = self.CONNRATE[key]
        ports = ports or self.fixed_ports
        relay = self.start(config, self.server_ports[:ports])
        try:
            rate, done, failed, slow_connect, slowest, cpu = self.load_run(
                "connrate", relay.port, clients, *self.rate_seconds, cpu_of=(relay, self.rate_seconds[0]))
        finally:
            relay.stop()
        what = f"{config}: conn/s with {clients} client(s) and {ports} upstream port(s)"
        report = self.fail if config in SAMEPORT else self.note
        if slowest >= (STALL_MS if config in SAMEPORT else 200):
            report(f"{what}: the slowest connection took {slowest:.0f} ms (the slowest connect() {slow_connect:.0f} ms)")
        if failed:
            report(f"{what}: {int(failed)} of {int(done + failed)} connections failed")
        out = {key: rate}
        if key == "conn8" and config != "direct" and done:
            out["conn8_cpu_us"] = cpu * 1e6 / done
        return out

    def idle_memory(self, config):
        if config == "direct":
            return {}
        relay = self.start(config, self.server_ports[: self.idle])
        socks = []
        try:
            before = relay.memory()
            for _ in range(self.idle):
                socks.append(self.idle_connection(relay.port))
            time.sleep(2 * self.settle)
            after = relay.memory()
        finally:
            for s in socks:
                s.close()
            relay.stop()
        return {"idle_kib": (after - before) / self.idle}

    def steps(self):
        """The measurements, in the order each repetition takes them: every configuration goes
        through one before the next starts, so that the configurations a column compares are
        measured minutes apart at most, not a whole repetition (a virtual machine's speed drifts)."""
        return ([("iperf", self.iperf), ("bulk", self.bulk), ("pingpong", self.pingpong)]
                + [(key, lambda config, key=key: self.connrate(config, key)) for key in self.CONNRATE]
                + [("sporadic", self.sporadic_latency)]
                + [("idle", self.idle_memory)])

    def measure(self, name, step, config):
        try:
            return step(config)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
            report = self.fail if config in SAMEPORT else self.note
            report(f"{config}: {name} failed: {str(error).strip()[:300]}")
            return {}


# ---------------------------------------------------------------------------------------- table

def render(configs, medians):
    direct = medians.get("direct", {})

    def ratio_cell(config, key, unit):
        value = medians.get(config, {}).get(key)
        if value is None:
            return "n/a"
        base = direct.get(key)
        text = f"{value:.1f} {unit}" if unit == "Gbit/s" else f"{value:,.0f}{unit}"
        return f"{value / base:.2f}x ({text})" if base else text

    def latency_cell(config, key):
        value = medians.get(config, {}).get(key)
        if value is None:
            return "n/a"
        base = direct.get(key)
        if config == "direct" or base is None:
            return f"({value:.1f} µs)"
        return f"{value - base:+.1f} µs ({value:.1f})"

    def plain(config, key, form):
        value = medians.get(config, {}).get(key)
        return "—" if value is None else form.format(value)

    lines = [
        "| configuration | iperf3 up | iperf3 down | bulk up | bulk down | CPU s/GiB | ping-pong p50 | ping-pong p99 "
        "| conn/s c=1 | conn/s c=8 | CPU µs/conn c=8 | conn/s 1 upstream | sporadic conn p50 | KiB/idle conn |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        cells = [
            LABELS[config],
            ratio_cell(config, "iperf_up", "Gbit/s"), ratio_cell(config, "iperf_down", "Gbit/s"),
            ratio_cell(config, "bulk_up", "Gbit/s"), ratio_cell(config, "bulk_down", "Gbit/s"),
            plain(config, "cpu_per_gib", "{:.2f}"),
            latency_cell(config, "p50"), latency_cell(config, "p99"),
            ratio_cell(config, "conn1", "/s"), ratio_cell(config, "conn8", "/s"),
            plain(config, "conn8_cpu_us", "{:.0f}"), ratio_cell(config, "conn1u", "/s"),
            latency_cell(config, "sporadic_p50"),
            plain(config, "idle_kib", "{:.1f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def head_to_head(runs, subject="sameport"):
    """`subject` against the best peer within each repetition: the figures of one repetition are
    seconds apart, so their ratio is spared the drift that moves a whole repetition's figures (15%
    from first to last on this virtual machine) and that medians taken per column keep. conn/s as
    the ratio to the best peer's rate, CPU per connection as the ratio to the cheapest peer's;
    ping-pong and sporadic connections as the added latency minus the best peer's."""
    peers = [c for c in runs if c in PEERS]
    if subject not in runs or not peers:
        return []
    lines = []
    # kind: "rate" (higher is better, a ratio), "cost" (lower is better, a ratio), "latency"
    # (lower is better, a difference in µs)
    for key, label, kind in (("conn1", "conn/s c=1", "rate"), ("conn8", "conn/s c=8", "rate"),
                             ("conn8_cpu_us", "CPU per connection c=8", "cost"),
                             ("conn1u", "conn/s 1 upstream", "rate"), ("p50", "ping-pong p50", "latency"),
                             ("p99", "ping-pong p99", "latency"), ("sporadic_p50", "sporadic connection p50", "latency")):
        figures, winners = [], []
        for rep, mine in enumerate(runs[subject]):
            theirs = {c: runs[c][rep][key] for c in peers if rep < len(runs[c]) and key in runs[c][rep]}
            if key not in mine or not theirs:
                continue
            best = (max if kind == "rate" else min)(theirs, key=theirs.get)
            winners.append(best)
            figures.append(mine[key] - theirs[best] if kind == "latency" else mine[key] / theirs[best])
        if not figures:
            continue
        shown = ", ".join(f"{f:+.1f}" if kind == "latency" else f"{f:.2f}x" for f in figures)
        middle = statistics.median(figures)
        summary = f"{middle:+.1f} µs" if kind == "latency" else f"{middle:.2f}x"
        best = max(set(winners), key=winners.count)
        lines.append(f"- {label}: {summary} (each repetition: {shown}; best peer mostly {LABELS[best]})")
    return lines


# ----------------------------------------------------------------------------------------- main

def build_sameport():
    env = dict(os.environ)
    if os.path.isdir("/opt/swift/usr/bin"):
        env["PATH"] = "/opt/swift/usr/bin:" + env.get("PATH", "")
    log("bench: swift build -c release")
    subprocess.run(["swift", "build", "-c", "release"], cwd=ROOT, env=env, check=True, stdout=sys.stderr)
    path = subprocess.run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True).stdout.strip()
    return os.path.join(path, "sameport")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("--reps", type=int, default=3, help="repetitions, in alternating order (default 3)")
    parser.add_argument("--quick", "--smoke", action="store_true",
                        help="tiny sizes, 1 repetition, no installing: a check that everything runs")
    parser.add_argument("--no-install", action="store_true", help="use only what is installed already")
    parser.add_argument("--bin", help="the sameport binary (default: swift build -c release)")
    parser.add_argument("--configs", help=f"comma-separated subset of {','.join(CONFIGS)} (direct is always run)")
    parser.add_argument("--bulk-mib", type=int, help="MiB per bulk transfer each way (default 1024; quick 256)")
    parser.add_argument("--iperf-mib", type=int, help="MiB per iperf3 run each way (default 2048; quick 256)")
    parser.add_argument("--idle", type=int, help="idle connections for the memory figure (default 1000; quick 100)")
    parser.add_argument("--fixed-ports", type=int, default=16,
                        help="upstream ports given to the fixed-port relay for conn/s (default 16)")
    parser.add_argument("--pin-cpu", type=int, default=(os.cpu_count() or 1) - 1,
                        help="run the ping-pong client, upstream and relay on this one CPU (default: the last "
                             "one; -1: leave them to the scheduler)")
    parser.add_argument("--json", help="also write every measurement to this file")
    parser.add_argument("--sameport-flags", metavar="FLAGS",
                        help="more flags for both sameport configurations, e.g. '--buffer-size 1048576'")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configurations and each process's log)")
    args = parser.parse_args()
    if args.quick:
        args.reps = 1
    args.bulk_mib = args.bulk_mib or (256 if args.quick else 1024)
    args.iperf_mib = args.iperf_mib or (256 if args.quick else 2048)
    args.idle = args.idle or (100 if args.quick else 1000)
    wanted = CONFIGS if not args.configs else ["direct"] + [c for c in args.configs.split(",") if c != "direct"]
    unknown = [c for c in wanted if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s): {', '.join(unknown)}")

    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    atexit.register(stop_all)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536), max(hard, 65536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    tools, notes = find_tools(install=not (args.no_install or args.quick))
    if not tools["gcc"]:
        raise SystemExit("bench: a C compiler (gcc) is needed for the load generator")
    binary = os.path.abspath(args.bin) if args.bin else build_sameport()
    peers = {"socat": "socat", "haproxy": "haproxy", "nginx": "nginx", "nginx-hc": "nginx", "proxyd": "proxyd"}
    configs = [c for c in wanted if c not in peers or tools.get(peers[c])]

    tmp = tempfile.mkdtemp(prefix="sameport-bench-")
    try:
        load = os.path.join(tmp, "bench_load")
        subprocess.run([tools["gcc"], "-O2", "-pthread", "-o", load, os.path.join(ROOT, "scripts", "bench_load.c")],
                       check=True)
        bench = Bench(args, tools, binary, load, tmp)
        bench.start_servers()
        runs = {c: [] for c in configs}
        started = time.monotonic()
        for rep in range(args.reps):
            bench.rep = rep
            results = {c: {} for c in configs}
            for index, (name, step) in enumerate(bench.steps()):
                # Alternating from one measurement to the next, and for each measurement from one
                # repetition to the next (whatever the number of measurements).
                order = configs if (rep + index) % 2 == 0 else configs[::-1]
                t0 = time.monotonic()
                taken = {}
                for config in order:
                    taken[config] = bench.measure(name, step, config)
                    results[config].update(taken[config])
                shown = "; ".join(f"{c} " + ", ".join(f"{k} {v:.4g}" for k, v in taken[c].items()) for c in order if taken[c])
                log(f"bench: rep {rep + 1}/{args.reps} {name} ({time.monotonic() - t0:.0f} s): {shown}")
            for config in configs:
                runs[config].append(results[config])
        medians = {}
        for config, results in runs.items():
            keys = {k for r in results for k in r}
            medians[config] = {k: statistics.median([r[k] for r in results if k in r]) for k in keys}
        found = versions(tools, binary)
        print(f"## sameport benchmark, {datetime.date.today().isoformat()}\n")
        print(f"command: {shlex.join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0].startswith(ROOT) else sys.argv[0]] + sys.argv[1:])}")
        print(f"machine: {os.cpu_count()} CPUs, Linux {found['kernel']}, loopback 127.0.0.1; "
              f"{args.reps} repetition(s), medians; {time.monotonic() - started:.0f} s")
        print("versions: " + "; ".join(f"{k} {v}" for k, v in found.items() if k != "kernel"))
        print(f"sizes: bulk {args.bulk_mib} MiB each way, iperf3 -n {args.iperf_mib}M, {bench.pings} ping-pongs, "
              f"conn/s over {bench.rate_seconds[1]:g} s, {bench.sporadic[0]} sporadic connections "
              f"{bench.sporadic[1] // 1000} ms apart, {args.idle} idle connections; the fixed-port relay gets "
              f"{args.fixed_ports} upstream ports for conn/s and {args.idle} for the idle connections; ping-pong "
              + (f"client, upstream and relay pinned to CPU {args.pin_cpu}" if args.pin_cpu >= 0 else "not pinned")
              + "\n")
        print(render(configs, medians))
        print()
        if "sameport" in configs:
            print("iperf3 n/a for sameport (same-port egress): iperf3's control and data connections go to one "
                  "upstream ip:port, and only one connection from 127.0.0.1:P to it can exist (4-tuple rule); "
                  "the bulk columns measure it instead.")
        versus = head_to_head(runs)
        if versus:
            print("\nsameport against the best peer of each repetition (median over repetitions; conn/s and "
                  "CPU per connection as ratios, latencies as µs added beyond the best peer's):")
            print("\n".join(versus))
        for note in notes:
            print(f"skipped: {note}")
        for note in bench.notes:
            print(f"note: {note}")
        for failure in bench.failures:
            print(f"FAILED: {failure}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"runs": runs, "medians": medians, "versions": found, "notes": notes}, f, indent=1)
        if bench.failures:
            raise SystemExit(1)
    finally:
        stop_all()
        if args.keep:
            log(f"bench: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        log("bench: interrupted")
        sys.exit(130)
