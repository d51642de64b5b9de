#!/usr/bin/env python3
"""A small, low-CPU HTTP/1.1 download load generator (stdlib only).

Each stream is its own process with one keep-alive connection that GETs the URL again and again,
reading bodies with recv_into() into a 1 MiB buffer (few syscalls, one copy, nothing written).

    httpload.py URL --streams N (--requests-per-stream K | --duration S) [--expect-size BYTES]

Prints one JSON object: bytes (body bytes received), requests, errors, wall_s (from the start
barrier to the last stream's end), client_cpu_s (user+sys of the stream processes).
"""
import argparse
import json
import multiprocessing as mp
import os
import resource
import signal
import socket
import sys
import time
import urllib.parse

BUF = 1 << 20


def parse_url(url):
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http":
        raise SystemExit(f"httpload: only http:// URLs: {url}")
    path = u.path + (f"?{u.query}" if u.query else "")
    return u.hostname, u.port or 80, path, u.netloc


def read_head(sock, pending):
    """Reads until the end of the response head. Returns (status, content_length, leftover)."""
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response head")
        pending += chunk
        if len(pending) > 65536:
            raise ValueError("response head too large")
    head, _, rest = pending.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = None
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    if length is None:
        raise ValueError("response without Content-Length")
    return status, length, rest


def die_with_parent():
    """Stream processes end when the load generator does, however it ends."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stream(idx, url, count, deadline_s, expect, barrier, out):
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    host, port, path, netloc = parse_url(url)
    req = f"GET {path} HTTP/1.1\r\nHost: {netloc}\r\nUser-Agent: peerd-bench\r\nAccept: */*\r\n\r\n".encode()
    buf = bytearray(BUF)
    view = memoryview(buf)
    got = reqs = errors = 0
    sock = None
    barrier.wait()
    t0 = time.monotonic()
    deadline = t0 + deadline_s if deadline_s else None
    try:
        while True:
            if count is not None and reqs + errors >= count:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if errors > 20:
                break
            try:
                if sock is None:
                    sock = socket.create_connection((host, port), timeout=30)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(req)
                status, length, rest = read_head(sock, b"")
                if status != 200 or (expect is not None and length != expect):
                    raise ValueError(f"status {status}, length {length}")
                left = length - len(rest)
                got += len(rest)
                while left > 0:
                    n = sock.recv_into(view, min(left, BUF))
                    if n == 0:
                        raise ConnectionError("connection closed mid-body")
                    left -= n
                    got += n
                reqs += 1
            except (OSError, ValueError) as e:
                errors += 1
                print(f"httpload: stream {idx}: {e}", file=sys.stderr)
                if sock is not None:
                    sock.close()
                    sock = None
                time.sleep(0.05)
    finally:
        if sock is not None:
            sock.close()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out.put((idx, got, reqs, errors, time.monotonic() - t0, ru.ru_utime + ru.ru_stime))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--requests-per-stream", type=int)
    ap.add_argument("--duration", type=float)
    ap.add_argument("--expect-size", type=int)
    ap.add_argument("--cpu", type=int, help="pin the stream processes to this CPU")
    a = ap.parse_args()
    if (a.requests_per_stream is None) == (a.duration is None):
        ap.error("give exactly one of --requests-per-stream and --duration")
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(a.streams + 1)
    out = ctx.Queue()
    procs = [ctx.Process(target=stream, args=(i, a.url, a.requests_per_stream, a.duration, a.expect_size, barrier, out),
                         daemon=True) for i in range(a.streams)]
    def stop(signum, _frame):
        for p in procs:
            if p.is_alive():
                p.terminate()
        os._exit(128 + signum)

    for p in procs:
        p.start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    barrier.wait(timeout=30)
    t0 = time.monotonic()
    results = [out.get(timeout=3600) for _ in procs]
    wall = time.monotonic() - t0
    for p in procs:
        p.join(timeout=10)
    res = {
        "bytes": sum(r[1] for r in results),
        "requests": sum(r[2] for r in results),
        "errors": sum(r[3] for r in results),
        "wall_s": wall,
        "client_cpu_s": sum(r[5] for r in results),
        "streams": a.streams,
    }
    print(json.dumps(res))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
