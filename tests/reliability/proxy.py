"""A small TCP proxy on loopback for network faults between workers and PostgreSQL.

Every connection is two sockets and two pump threads. The proxy reads the libpq startup
packet (clients connect with ``sslmode=disable&gssencmode=disable`` so it is plain text)
to learn the connection's ``application_name`` (``sa_jobs:listener``, ``sa_jobs:completer``
...), so faults can target one worker service. Faults:

- ``blackhole``: bytes in both directions are silently dropped while both sockets stay
  open: a half-open connection as a client sees it after a NAT/firewall/host drop.
- ``cut``: both sockets are closed (the client sees the connection reset/closed).
- ``latency``: every chunk is delivered ``latency`` seconds after it was read, in order,
  in each direction.
"""

from __future__ import annotations

import collections
import socket
import struct
import threading
import time
from typing import Callable, Optional

from .cluster import free_port

Predicate = Callable[["ProxyConn"], bool]


class ProxyConn:
    def __init__(self, proxy: "Proxy", client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.app: Optional[str] = None
        self.mode = "pass"
        self.opened = time.monotonic()
        self.closed = False
        self._startup = b""
        self._lock = threading.Lock()
        for src, dst, c2s in ((client, server, True), (server, client, False)):
            queue: collections.deque[tuple[float, bytes]] = collections.deque()
            cond = threading.Condition()
            threading.Thread(target=self._read, args=(src, queue, cond, c2s), daemon=True).start()
            threading.Thread(target=self._write, args=(dst, queue, cond), daemon=True).start()

    def _sniff(self, data: bytes) -> None:
        if self.app is not None or len(self._startup) > 4096:
            return
        self._startup += data
        if len(self._startup) < 8:
            return
        length, code = struct.unpack("!II", self._startup[:8])
        if code in (80877103, 80877104):  # SSLRequest / GSSENCRequest: not expected
            self._startup = self._startup[8:]
            return
        if len(self._startup) < length:
            return
        parts = self._startup[8:length].split(b"\x00")
        pairs = dict(zip(parts[0::2], parts[1::2]))
        self.app = pairs.get(b"application_name", b"").decode(errors="replace")
        self.proxy._classify(self)

    def _read(self, src: socket.socket, queue: collections.deque, cond: threading.Condition, c2s: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if c2s:
                    self._sniff(data)
                with cond:
                    queue.append((time.monotonic() + self.proxy.latency, data))
                    cond.notify()
        except OSError:
            pass
        with cond:
            queue.append((0.0, b""))
            cond.notify()

    def _write(self, dst: socket.socket, queue: collections.deque, cond: threading.Condition) -> None:
        try:
            while True:
                with cond:
                    while not queue:
                        cond.wait()
                    due, data = queue.popleft()
                if not data:
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if self.mode == "blackhole":
                    continue
                dst.sendall(data)
        except OSError:
            pass
        if self.mode != "blackhole":
            self.cut()

    def cut(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for s in (self.client, self.server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def blackhole(self) -> None:
        self.mode = "blackhole"

    def __repr__(self) -> str:
        return f"<ProxyConn app={self.app} mode={self.mode} closed={self.closed}>"


class Proxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.latency = 0.0
        self.conns: list[ProxyConn] = []
        self.accepted = 0
        # New connections whose app name matches are blackholed from their first byte.
        self.blackhole_new: Optional[Predicate] = None
        self.refuse = False
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(256)
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            conn = ProxyConn(self, client, server)
            with self._lock:
                self.conns.append(conn)
                self.accepted += 1

    def _classify(self, conn: ProxyConn) -> None:
        rule = self.blackhole_new
        if rule is not None and rule(conn):
            conn.blackhole()

    def live(self, app: Optional[str] = None) -> list[ProxyConn]:
        with self._lock:
            return [c for c in self.conns if not c.closed and (app is None or c.app == app)]

    def cut_all(self, app: Optional[str] = None) -> int:
        victims = self.live(app)
        for c in victims:
            c.cut()
        return len(victims)

    def blackhole(self, app: str) -> list[ProxyConn]:
        victims = self.live(app)
        for c in victims:
            c.blackhole()
        return victims

    def close(self) -> None:
        self._stopped = True
        self._sock.close()
        for c in self.live():
            c.cut()
