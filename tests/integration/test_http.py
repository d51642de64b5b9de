"""HTTP/1.1 framing as real clients produce it: request heads that arrive in several TCP segments,
keep-alive and pipelined requests."""

import socket
import time

import pytest

from conftest import Reader, http, node_ip, read_response

NODE = 2


def _conn():
    s = socket.create_connection((node_ip(NODE), 5000), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def test_request_head_split_across_segments(lab):
    """A head that arrives in pieces (slow links, big headers, proxies) is one request."""
    for cut in (5, 18, 29):
        with _conn() as s:
            head = b"GET /v2/ HTTP/1.1\r\nHost: peerd\r\nConnection: close\r\n\r\n"
            s.sendall(head[:cut])
            time.sleep(0.2)
            s.sendall(head[cut:])
            r = read_response(s, "GET")
            assert r.status == 200, (cut, r)


def test_keep_alive_serves_several_requests(lab):
    with _conn() as s:
        rd = Reader(s)
        for _ in range(3):
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: peerd\r\n\r\n")
            r = read_response(rd, "GET")
            assert r.status == 200, r
            assert r.body == b"{}"


def test_pipelined_requests_are_answered_in_order(lab):
    with _conn() as s:
        s.sendall(
            b"GET /v2/ HTTP/1.1\r\nHost: peerd\r\n\r\n"
            b"GET /v2/a/manifests/sha256:00 HTTP/1.1\r\nHost: peerd\r\n\r\n"
            b"HEAD /v2/ HTTP/1.1\r\nHost: peerd\r\nConnection: close\r\n\r\n"
        )
        rd = Reader(s)
        first = read_response(rd, "GET")
        second = read_response(rd, "GET")
        third = read_response(rd, "HEAD")
        assert (first.status, second.status, third.status) == (200, 400, 200), (first, second, third)


def test_v2_api_version_check(lab):
    for method in ("GET", "HEAD"):
        r = http(NODE, method, "/v2/")
        assert r.status == 200, r
