#!/usr/bin/env python3
"""The peers of scripts/systemd-container-test.sh, run in the container's network namespace.

  upstream --listen IP:PORT --peers FILE
      An echo server that appends each connection's peer address (IP:PORT) to FILE, one a line,
      before echoing its bytes back; it half-closes when the client does.
  echo --connect IP:PORT --size N [--timeout S]
      Connects, sends N random bytes, half-closes, reads to EOF and checks that the same bytes
      came back. Exit 0 and one line on success; exit 1 and what was seen otherwise.
  session --connect IP:PORT --commands FIFO --results FILE [--timeout S]
      Holds one connection and runs the commands written to FIFO, one a line, appending a result
      line to FILE for each: `send TEXT` (TEXT and a newline sent, the echo awaited: `ok TEXT`),
      `close` (half-close, EOF awaited: `closed`). The first line is `connected LOCAL-ADDRESS`.
      Any failure is written as `error ...` and ends the session.
"""
import argparse
import os
import socket
import socketserver
import sys
import threading
import time


def address(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def upstream(args):
    lock = threading.Lock()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            peer = "%s:%d" % self.client_address[:2]
            with lock, open(args.peers, "a") as peers:
                peers.write(peer + "\n")
            sock = self.request
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError as error:
                print("upstream: %s: %s" % (peer, error), flush=True)

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    server = Server(address(args.listen), Handler)
    print("upstream: listening on %s" % args.listen, flush=True)
    server.serve_forever()


def receive_exactly(sock, count, deadline):
    data = b""
    while len(data) < count:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def echo(args):
    payload = os.urandom(args.size)
    deadline = time.monotonic() + args.timeout
    try:
        sock = socket.create_connection(address(args.connect), timeout=args.timeout)
    except OSError as error:
        print("cannot connect to %s: %s" % (args.connect, error))
        return 1
    local = "%s:%d" % sock.getsockname()[:2]
    failure = []

    def send():
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError as error:
            failure.append(error)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = bytearray()
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        else:
            raise socket.timeout()
    except (socket.timeout, TimeoutError):
        print("no EOF within %ss from %s: %d of %d bytes came back"
              % (args.timeout, args.connect, len(received), len(payload)))
        return 1
    except OSError as error:
        print("%s after %d of %d bytes came back" % (error, len(received), len(payload)))
        return 1
    finally:
        sock.close()
    sender.join(5)
    if failure:
        print("sending to %s failed: %s" % (args.connect, failure[0]))
        return 1
    if bytes(received) != payload:
        first = next((i for i, (a, b) in enumerate(zip(received, payload)) if a != b),
                     min(len(received), len(payload)))
        print("%d bytes came back for %d sent, first difference at byte %d"
              % (len(received), len(payload), first))
        return 1
    print("%d bytes echoed byte-for-byte through %s (client %s)" % (len(payload), args.connect, local))
    return 0


def session(args):
    results = open(args.results, "a", buffering=1)
    try:
        sock = socket.create_connection(address(args.connect), timeout=args.timeout)
    except OSError as error:
        results.write("error connect %s: %s\n" % (args.connect, error))
        return 1
    results.write("connected %s:%d\n" % sock.getsockname()[:2])
    with open(args.commands) as commands:
        for line in commands:
            command, _, text = line.rstrip("\n").partition(" ")
            deadline = time.monotonic() + args.timeout
            try:
                if command == "send":
                    message = (text + "\n").encode()
                    sock.sendall(message)
                    back = receive_exactly(sock, len(message), deadline)
                    if back != message:
                        results.write("error sent %r, got %r back\n" % (message, back))
                        return 1
                    results.write("ok %s\n" % text)
                elif command == "close":
                    sock.shutdown(socket.SHUT_WR)
                    rest = receive_exactly(sock, 1, deadline)
                    if rest:
                        results.write("error unexpected bytes before EOF: %r\n" % rest)
                        return 1
                    results.write("closed\n")
                    sock.close()
                    return 0
                else:
                    results.write("error unknown command %r\n" % line)
                    return 1
            except OSError as error:
                results.write("error %s: %s\n" % (command, error or type(error).__name__))
                return 1
    results.write("error the command pipe closed\n")
    return 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("upstream")
    p.add_argument("--listen", required=True)
    p.add_argument("--peers", required=True)
    p = commands.add_parser("echo")
    p.add_argument("--connect", required=True)
    p.add_argument("--size", type=int, default=65536)
    p.add_argument("--timeout", type=float, default=20)
    p = commands.add_parser("session")
    p.add_argument("--connect", required=True)
    p.add_argument("--commands", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--timeout", type=float, default=20)
    args = parser.parse_args()
    return {"upstream": upstream, "echo": echo, "session": session}[args.command](args) or 0


if __name__ == "__main__":
    sys.exit(main())
