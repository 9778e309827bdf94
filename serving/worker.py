"""A gthread worker that reads each whole request in its event loop before a thread sees it.

gunicorn's ``gthread`` worker hands a connection to a request thread as soon as its first
byte arrives; the thread then reads the headers and the body with blocking calls and no
overall deadline. A client that sends ``POST /predict HTTP/1.1\\r\\nHost: x\\r\\n`` and
waits, or a body shorter than its ``Content-Length``, holds that thread for as long as it
likes; two such clients stopped a two-thread worker, ``/health`` included, and the
kubelet then restarted the pod. gunicorn's ``timeout`` never fires, because the worker's
main loop keeps notifying the arbiter.

:class:`BufferingThreadWorker` does what a buffering proxy (nginx, an Ingress) or
waitress does: the main loop reads requests with non-blocking sockets into a per-connection
buffer, and only a *complete* request (head and whole body, ``Content-Length`` or
chunked) goes to the thread pool, where gunicorn's own parser reads it from memory. So:

* request threads only ever run complete requests: slow or stalled clients cost a
  buffer, never a thread, and ``/health`` keeps answering;
* every request must arrive within ``PLANTML_READ_TIMEOUT`` seconds of its first byte
  (a total deadline, not a per-read one, which a byte-a-second client would defeat),
  else it is answered 408 and closed; an idle keep-alive connection is closed after
  gunicorn's ``keepalive`` seconds;
* a head over 64 KiB is 431; a body over ``PLANTML_MAX_UPLOAD_MB`` is 413 whether it
  declares a ``Content-Length`` or is chunked, answered before the body is read;
* the bytes buffered by one worker are bounded (``(http_threads + 2) x upload limit``):
  beyond that, connections that are sending a body are paused until others finish;
* responses are written with a socket timeout (the same seconds), so a client that
  does not read its answer cannot hold a thread either;
* closing after an error answer lingers without blocking the loop (gunicorn's own
  graceful close waits up to 2 s inside the main loop).

Plain HTTP/1.x only; with TLS or HTTP/2 configured it behaves exactly as ``gthread``.
The deployed manifests also put a buffering proxy in front (``k8s/base/ingress.yaml``).
"""

from __future__ import annotations

import errno
import json
import logging
import selectors
import socket
import time
from functools import partial
from typing import Any

from gunicorn.http.unreader import Unreader
from gunicorn.workers.gthread import TConn, ThreadWorker

# The framing lives in serving.framing; its names stay importable from here (tests use them).
from serving.framing import MAX_CHUNK_LINE, MAX_HEAD_BYTES, BadFraming, RequestScan, RequestTooLarge
from serving.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "BadFraming", "BufferUnreader", "BufferingThreadWorker", "MAX_CHUNK_LINE", "MAX_HEAD_BYTES",
    "RequestScan", "RequestTooLarge",
]

RECV_BYTES = 256 * 1024
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 16 * 1024 * 1024


class BufferUnreader(Unreader):
    """gunicorn's unreader over bytes already received: never touches the socket."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._data: bytes | None = data

    def chunk(self) -> bytes:
        """The buffered bytes on the first call, then nothing (end of stream)."""
        data, self._data = self._data, None
        return data or b""


def _error_response(status: str, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message, "reason": reason}).encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head + body


class BufferingThreadWorker(ThreadWorker):
    """``gthread`` with complete-request buffering, a total read deadline and size limits."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = Settings.from_env()
        self.read_timeout = float(settings.read_timeout)
        self.max_body = settings.max_upload_bytes
        self.max_upload_mb = settings.max_upload_mb
        self.buffer_budget = (settings.http_threads + 2) * self.max_body
        self.buffered = 0
        self.reading: dict[TConn, None] = {}  # insertion-ordered set
        self.paused: dict[TConn, None] = {}
        self.lingering: dict[socket.socket, list[float]] = {}  # socket -> [deadline, bytes discarded]

    # ------------------------------------------------------------------ connection intake

    def _plain_http(self) -> bool:
        return not self.cfg.is_ssl

    def accept(self, listener: socket.socket) -> None:
        """Take a new connection and start buffering its first request in the event loop."""
        if not self._plain_http():
            return super().accept(listener)
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())  # non-blocking
        self._await_request(conn, b"")

    def _await_request(self, conn: TConn, leftover: bytes) -> None:
        """Start buffering the next request on ``conn`` (``leftover``: pipelined bytes)."""
        conn.rbuf = bytearray(leftover)
        conn.scan = RequestScan(self.max_body)
        conn.sent_continue = False
        conn.held = len(leftover)
        self.buffered += conn.held
        conn.idle_deadline = time.monotonic() + max(1.0, float(self.cfg.keepalive or 0))
        conn.read_deadline = time.monotonic() + self.read_timeout if leftover else None
        self.reading[conn] = None
        if leftover and self._advance(conn):
            return
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn: TConn, sock: socket.socket) -> None:
        try:
            self._read_some(conn, sock)
        except Exception:  # noqa: BLE001 - one connection's bug must not end the worker's loop
            log.exception("error while reading a request from %s; closing it", conn.client)
            if conn in self.reading or conn in self.paused:
                self._drop(conn)

    def _read_some(self, conn: TConn, sock: socket.socket) -> None:
        if self.buffered >= self.buffer_budget and conn.scan.head_end is not None:
            self._pause(conn)
            return
        try:
            data = sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)
            return
        if conn.read_deadline is None:
            conn.read_deadline = time.monotonic() + self.read_timeout
        conn.rbuf += data
        conn.held += len(data)
        self.buffered += len(data)
        self._advance(conn)

    def _advance(self, conn: TConn) -> bool:
        """Check the buffer; dispatch or refuse the request once it is decided. True if done."""
        try:
            end = conn.scan.feed(conn.rbuf)
        except RequestTooLarge:
            self._refuse(conn, "413 Content Too Large", "payload_too_large",
                         f"request body exceeds the {self.max_upload_mb:g} MB limit (PLANTML_MAX_UPLOAD_MB)")
            return True
        except BadFraming as exc:
            status = "431 Request Header Fields Too Large" if "head" in str(exc) else "400 Bad Request"
            self._refuse(conn, status, "malformed_request", f"malformed request: {exc}")
            return True
        if end is None:
            if conn.scan.expects_continue and not conn.sent_continue:
                conn.sent_continue = True
                self._send_quietly(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
            return False
        request, leftover = bytes(conn.rbuf[:end]), bytes(conn.rbuf[end:])
        self._stop_reading(conn)
        conn.rbuf = bytearray()
        conn.request_bytes = request
        conn.leftover = leftover
        self.enqueue_req(conn)
        return True

    def _stop_reading(self, conn: TConn) -> None:
        self.reading.pop(conn, None)
        self.paused.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _pause(self, conn: TConn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.paused[conn] = None

    def _resume_paused(self) -> None:
        while self.paused and self.buffered < self.buffer_budget:
            conn = next(iter(self.paused))
            del self.paused[conn]
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _release(self, conn: TConn) -> None:
        self.buffered -= getattr(conn, "held", 0)
        conn.held = 0

    def _drop(self, conn: TConn) -> None:
        """Close a connection that is being read (client gone, or idle)."""
        self._stop_reading(conn)
        self._release(conn)
        self.nr_conns -= 1
        conn.close()
        self._resume_paused()

    def _refuse(self, conn: TConn, status: str, reason: str, message: str) -> None:
        """Answer an error from the event loop, then close (lingering, without blocking)."""
        log.info("refused a request from %s: %s (%s)", conn.client, status, message)
        self._count_rejection(reason)
        self._stop_reading(conn)
        self._release(conn)
        self.nr_conns -= 1
        self._send_quietly(conn.sock, _error_response(status, reason, message))
        self._linger(conn.sock)
        self._resume_paused()

    def _count_rejection(self, reason: str) -> None:
        state = getattr(getattr(self, "wsgi", None), "extensions", {}).get("plantml")
        if state is not None:
            try:
                state.metrics.reject(reason)
            except Exception:  # noqa: BLE001 - metrics must never break the event loop
                log.debug("could not count a rejection", exc_info=True)

    @staticmethod
    def _send_quietly(sock: socket.socket, payload: bytes) -> None:
        try:
            sock.send(payload)  # non-blocking: small payloads fit the socket buffer
        except OSError:
            pass

    # ------------------------------------------------------------------ lingering close

    def _linger(self, sock: socket.socket) -> None:
        """Half-close and discard what the client still sends, so our answer is not reset."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            self.poller.register(sock, selectors.EVENT_READ, self._on_linger_readable)
        except (OSError, ValueError, KeyError):
            sock.close()
            return
        self.lingering[sock] = [time.monotonic() + LINGER_SECONDS, 0.0]

    def _on_linger_readable(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        entry = self.lingering.get(sock)
        if entry is None:
            self._end_linger(sock)
            return
        entry[1] += len(data)
        if not data or entry[1] > LINGER_MAX_BYTES:
            self._end_linger(sock)

    def _end_linger(self, sock: socket.socket) -> None:
        self.lingering.pop(sock, None)
        try:
            self.poller.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        sock.close()

    # ------------------------------------------------------------------ timeouts

    def murder_pending(self) -> None:
        """Expire idle connections, requests past their read deadline, and lingering closes."""
        super().murder_pending()
        now = time.monotonic()
        for conn in list(self.reading) + list(self.paused):
            if conn.read_deadline is None:  # idle: no byte of a request yet
                if now >= conn.idle_deadline or not self.alive:
                    self._drop(conn)
            elif now >= conn.read_deadline:
                self._refuse(conn, "408 Request Timeout", "request_timeout",
                             f"the request was not received within {self.read_timeout:g} s (PLANTML_READ_TIMEOUT)")
        for sock, (deadline, _) in list(self.lingering.items()):
            if now >= deadline:
                self._end_linger(sock)

    # ------------------------------------------------------------------ thread side

    def handle(self, conn: TConn) -> Any:
        """Run a complete, buffered request on a thread: gunicorn's parser reads it from memory."""
        if not self._plain_http() or not hasattr(conn, "request_bytes"):
            return super().handle(conn)
        conn.data_ready = True
        conn.init()  # blocking socket + parser, once per connection
        conn.parser.unreader = BufferUnreader(conn.request_bytes)
        conn.request_bytes = b""
        return super().handle(conn)

    def handle_request(self, req: Any, conn: TConn) -> Any:
        """Answer one parsed request; the socket is only written to, with a deadline."""
        # the request is already in memory, so the timeout bounds only a client that does not read
        conn.sock.settimeout(self.read_timeout)
        if getattr(conn, "sent_continue", False):
            req._expected_100_continue = False  # the event loop already sent "100 Continue"
        return super().handle_request(req, conn)

    def finish_request(self, conn: TConn, fs: Any) -> None:
        """Back in the event loop: await the next request on a kept-alive connection, else close."""
        if not self._plain_http():
            return super().finish_request(conn, fs)
        self._release(conn)
        try:
            keep = fs.result() if not fs.cancelled() else False
        except Exception:  # noqa: BLE001
            keep = False
        try:
            if keep and self.alive:
                conn.sock.setblocking(False)
                self._await_request(conn, getattr(conn, "leftover", b""))
            else:
                self.nr_conns -= 1
                try:
                    conn.sock.setblocking(False)
                except OSError:
                    pass
                self._linger(conn.sock)
        except Exception:  # noqa: BLE001 - a broken socket must not take the loop down
            log.debug("closing a connection after an error", exc_info=True)
            conn.close()
        self._resume_paused()
