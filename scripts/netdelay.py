#!/usr/bin/env python3
"""A delaying TCP proxy for loopback benchmarks: emulates a link with a one-way latency and a rate cap.

    python scripts/netdelay.py --target 8081 [--port 0 --port-file F] [--delay-ms 1] [--rate-mbit 1000]

Listens on 127.0.0.1 and forwards every connection to 127.0.0.1:TARGET (it never connects anywhere
else). Each direction of each connection is its own link: a chunk read at time t leaves the link at
    start = max(t, link_free);  link_free = start + len / rate;  delivered at link_free + delay
(store-and-forward per chunk of up to 64 KiB; bytes keep their order). The default, 1 ms and
1000 Mbit/s (125 MB/s), is a 1 Gbit/s LAN hop with 2 ms round trip. Threads with time.sleep (finer
than asyncio's millisecond-rounded timers); TCP_NODELAY on both sides. SIGTERM/SIGINT stop it and it
prints the bytes it forwarded to stderr.
"""
from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import sys
import threading
import time

CHUNK = 65536
QUEUE_CHUNKS = 256          # at most 16 MiB in flight per direction; then the reader blocks (TCP backpressure)
TARGET_HOST = "127.0.0.1"   # the only address this proxy ever connects to


class Link:
    """One direction of one connection: a reader thread stamps chunks, a writer thread delivers them."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, rate: float, stats: dict, key: str,
                 on_error) -> None:
        self.src, self.dst, self.delay, self.rate = src, dst, delay, rate
        self.stats, self.key, self.on_error = stats, key, on_error
        self.q: queue.Queue[tuple[float, bytes] | None] = queue.Queue(QUEUE_CHUNKS)
        self.link_free = 0.0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.writer = threading.Thread(target=self._write, daemon=True)

    def start(self) -> None:
        self.reader.start()
        self.writer.start()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(CHUNK)
                if not data:
                    break
                now = time.monotonic()
                start = max(now, self.link_free)
                self.link_free = start + len(data) / self.rate
                self.q.put((self.link_free + self.delay, data))
        except OSError:
            pass
        self.q.put(None)

    def _write(self) -> None:
        try:
            while True:
                item = self.q.get()
                if item is None:
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.dst.sendall(data)
                self.stats[self.key] += len(data)
        except OSError:
            self.on_error()


def serve_connection(client: socket.socket, target_port: int, delay: float, rate: float, stats: dict) -> None:
    try:
        upstream = socket.create_connection((TARGET_HOST, target_port), timeout=10)
    except OSError as e:
        print(f"netdelay: cannot reach {TARGET_HOST}:{target_port}: {e}", file=sys.stderr)
        client.close()
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    closed = threading.Event()

    def close_both() -> None:
        if not closed.is_set():
            closed.set()
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    links = [Link(client, upstream, delay, rate, stats, "up", close_both),
             Link(upstream, client, delay, rate, stats, "down", close_both)]
    for link in links:
        link.start()
    for link in links:
        link.writer.join()
        link.reader.join()
    client.close()
    upstream.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="PORT or 127.0.0.1:PORT to forward to (loopback only)")
    ap.add_argument("--port", type=int, default=0, help="port to listen on, on 127.0.0.1 (0 = any)")
    ap.add_argument("--port-file", default=None, help="write the bound port here once listening")
    ap.add_argument("--delay-ms", type=float, default=1.0, help="one-way delay per direction (default 1)")
    ap.add_argument("--rate-mbit", type=float, default=1000.0, help="rate cap per direction, Mbit/s (default 1000)")
    args = ap.parse_args()
    host, _, port_s = args.target.rpartition(":")
    if host not in ("", TARGET_HOST, "localhost"):
        ap.error(f"--target must be on {TARGET_HOST}")
    target_port = int(port_s)
    delay, rate = args.delay_ms / 1e3, args.rate_mbit * 1e6 / 8
    if rate <= 0:
        ap.error("--rate-mbit must be > 0")

    def stop(signum, frame) -> None:  # noqa: ARG001
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stats = {"up": 0, "down": 0, "conns": 0}
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((TARGET_HOST, args.port))
    lsock.listen(64)
    port = lsock.getsockname()[1]
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(f"{port}\n")
        os.replace(args.port_file + ".tmp", args.port_file)
    print(f"netdelay: 127.0.0.1:{port} -> {TARGET_HOST}:{target_port}, {args.delay_ms} ms each way, "
          f"{args.rate_mbit:g} Mbit/s each way", file=sys.stderr, flush=True)
    try:
        while True:
            client, _ = lsock.accept()
            stats["conns"] += 1
            threading.Thread(target=serve_connection, args=(client, target_port, delay, rate, stats), daemon=True).start()
    finally:
        lsock.close()
        print(f"netdelay: {stats['conns']} connection(s), {stats['up'] / 2**20:.1f} MiB to the target, "
              f"{stats['down'] / 2**20:.1f} MiB back", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
