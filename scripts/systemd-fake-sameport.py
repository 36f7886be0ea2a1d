#!/usr/bin/python3
"""A stand-in for sameport's systemd integration, to test scripts/systemd-container-test.sh itself.

NOT sameport. It implements, crudely and in Python, the contract the container test checks:
socket activation by FileDescriptorName= (SO_REUSEPORT switched on, fchown of the inherited
socket, CAP_CHOWN dropped), Type=notify (READY=1, STATUS=, WATCHDOG=1, RELOADING=1/READY=1 on
SIGHUP, STOPPING=1 and a drain on SIGTERM), fixed-port egress, one `connection ended` line per
connection, and <N> journal priority prefixes. It lets the test's own machinery be proven
before (and independently of) the Swift implementation:

  scripts/systemd-container-test.sh scripts/systemd-fake-sameport.py

Usage as the test calls it: `run --config FILE`, `check --config FILE`.
"""
import ctypes
import os
import select
import signal
import socket
import sys
import threading
import time
import tomllib

RELAY_KEYS = {"name", "listen", "upstream", "egress", "on_busy", "connect_timeout", "idle_timeout",
              "max_connections", "queue_limit", "buffer_size", "allow", "deny", "splice", "pipe_size"}
TOP_KEYS = {"relay", "defaults", "drain_timeout"}


def log(priority, message):
    prefix = "<%d>" % priority if os.environ.get("JOURNAL_STREAM") else ""
    sys.stderr.write("%s%s\n" % (prefix, message))
    sys.stderr.flush()


def notify(message):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), path)


def address(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def duration(text):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def load(path):
    with open(path, "rb") as file:
        data = tomllib.load(file)
    for key in data:
        if key not in TOP_KEYS:
            raise ValueError("%s: unknown key '%s'" % (path, key))
    relays = {}
    for relay in data.get("relay", []):
        for key in relay:
            if key not in RELAY_KEYS:
                raise ValueError("%s: unknown key '%s' in relay" % (path, key))
        upstream = relay["upstream"]
        relays[relay.get("name", "main")] = (relay["listen"], upstream if isinstance(upstream, str) else upstream[0])
    return relays, duration(data.get("drain_timeout", "30s"))


class Capabilities:
    libc = ctypes.CDLL(None, use_errno=True)

    @classmethod
    def drop_chown(cls):
        cls.libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()
        if cls.libc.capget(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capget")
        for index in (0, 1, 2):  # effective, permitted, inheritable of the first 32 capabilities
            data[index] &= ~1  # CAP_CHOWN
        if cls.libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset")


class Daemon:
    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.open = 0
        self.served = 0
        self.relays = {}  # name -> (listen, upstream, socket, stop event, inherited)
        self.inherited = {}
        if os.environ.get("LISTEN_PID") == str(os.getpid()):
            names = os.environ.get("LISTEN_FDNAMES", "").split(":")
            for index in range(int(os.environ.get("LISTEN_FDS", "0"))):
                self.inherited[names[index] if index < len(names) else "unknown"] = 3 + index

    def status(self):
        with self.lock:
            return "%d relay%s, %d open connections, 0 queued, %d served" % (
                len(self.relays), "" if len(self.relays) == 1 else "s", self.open, self.served)

    def start_relay(self, name, listen, upstream):
        if name in self.inherited:
            sock = socket.socket(fileno=self.inherited[name])
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
                log(4, "relay %s: SO_REUSEPORT was off on the inherited socket; set ReusePort=yes" % name)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if os.fstat(sock.fileno()).st_uid != os.geteuid():
                os.fchown(sock.fileno(), os.geteuid(), os.getegid())
            inherited = True
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address(listen))
            sock.listen(128)
            inherited = False
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind(address(listen))
        probe.close()
        stop = threading.Event()
        self.relays[name] = (listen, upstream, sock, stop, inherited)
        threading.Thread(target=self.accept_loop, args=(name, sock, stop, upstream, inherited), daemon=True).start()
        log(6, "relay %s listening on %s -> %s%s" % (name, listen, upstream, " (inherited socket)" if inherited else ""))

    def stop_relay(self, name):
        listen, upstream, sock, stop, inherited = self.relays.pop(name)
        stop.set()

    def accept_loop(self, name, sock, stop, upstream, inherited):
        while not stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.1)
            if ready and not stop.is_set():
                client, peer = sock.accept()
                with self.lock:
                    self.open += 1
                threading.Thread(target=self.serve, args=(name, client, peer, upstream), daemon=True).start()
        if not inherited:  # an inherited socket is PID 1's too: never shut down, left open
            sock.close()

    def serve(self, name, client, peer, upstream):
        egress = client.getsockname()
        counts = [0, 0]
        end = "completed"
        try:
            out = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            out.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            out.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            out.bind(egress)
            deadline = time.monotonic() + 5
            while True:
                try:
                    out.connect(address(upstream))
                    break
                except OSError as error:
                    if error.errno != 99 or time.monotonic() > deadline:  # EADDRNOTAVAIL: retry
                        raise
                    time.sleep(0.05)

            def pump(source, target, index):
                while True:
                    data = source.recv(65536)
                    if not data:
                        target.shutdown(socket.SHUT_WR)
                        return
                    target.sendall(data)
                    counts[index] += len(data)

            other = threading.Thread(target=pump, args=(out, client, 1))
            other.start()
            pump(client, out, 0)
            other.join()
            out.close()
        except OSError as error:
            end = "error (%s)" % error
        client.close()
        with self.lock:
            self.open -= 1
            self.served += 1
        log(6, "connection ended relay=%s client=%s:%d egress=%s:%d upstream=%s bytes_to_upstream=%d "
               "bytes_to_client=%d end=%s" % (name, peer[0], peer[1], egress[0], egress[1], upstream,
                                              counts[0], counts[1], end))

    def apply(self, relays):
        for name in list(self.relays):
            if name not in relays or self.relays[name][:2] != relays[name]:
                self.stop_relay(name)
        for name, (listen, upstream) in relays.items():
            if name not in self.relays:
                self.start_relay(name, listen, upstream)

    def run(self):
        relays, drain = load(self.path)
        self.apply(relays)
        if self.inherited:
            Capabilities.drop_chown()
        notify("READY=1\nSTATUS=%s" % self.status())
        signals = []
        signal.signal(signal.SIGHUP, lambda *_: signals.append("HUP"))
        signal.signal(signal.SIGTERM, lambda *_: signals.append("TERM"))
        watchdog = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
        if os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
            watchdog = 0
        next_ping = time.monotonic()
        while True:
            time.sleep(0.05)
            if watchdog and time.monotonic() >= next_ping:
                notify("WATCHDOG=1\nSTATUS=%s" % self.status())
                next_ping = time.monotonic() + watchdog / 2
            while signals:
                if signals.pop(0) == "HUP":
                    notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
                    try:
                        relays, drain = load(self.path)
                        self.apply(relays)
                        log(5, "reloaded %s: %d relays" % (self.path, len(self.relays)))
                    except (OSError, ValueError, KeyError, tomllib.TOMLDecodeError) as error:
                        log(4, "reload failed, still running the previous configuration: %s" % error)
                    notify("READY=1\nSTATUS=%s" % self.status())
                else:
                    notify("STOPPING=1")
                    log(6, "stopping on SIGTERM")
                    for name in list(self.relays):
                        self.stop_relay(name)
                    deadline = time.monotonic() + drain
                    while self.open and time.monotonic() < deadline:
                        time.sleep(0.05)
                    log(6, "stopped")
                    return 0


def main():
    if len(sys.argv) < 4 or sys.argv[1] not in ("run", "check") or sys.argv[2] != "--config":
        sys.stderr.write("usage: %s run|check --config FILE\n" % sys.argv[0])
        return 2
    try:
        relays, _ = load(sys.argv[3])
    except (OSError, ValueError, KeyError, tomllib.TOMLDecodeError) as error:
        sys.stderr.write("%s\n" % error)
        return 2
    if sys.argv[1] == "check":
        print("%s: %d relay%s, configuration OK" % (sys.argv[3], len(relays), "" if len(relays) == 1 else "s"))
        return 0
    return Daemon(sys.argv[3]).run()


if __name__ == "__main__":
    sys.exit(main())
