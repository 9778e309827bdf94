"""Where one HTTP/1.x request ends in a growing buffer, and what must never be read.

The buffering worker (:mod:`serving.worker`) keeps each connection's bytes in memory until
:class:`RequestScan` says the request is complete (head and whole body, ``Content-Length``
or chunked). It only delimits: gunicorn's parser still does the real, strict parsing of
what is handed over. Kept apart from the worker because it is pure byte arithmetic (no
sockets, no gunicorn), tested on its own in ``tests/test_serving_unit.py``.
"""

from __future__ import annotations

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE = 1024


class RequestTooLarge(Exception):
    """The request's body (declared or chunked) is over the upload limit."""


class BadFraming(Exception):
    """The request cannot be delimited (malformed chunking, conflicting lengths)."""


class RequestScan:
    """Incremental framing of one HTTP/1.x request in a growing buffer.

    Only finds where the request ends (and refuses what must never be read); gunicorn's
    parser still does the real, strict parsing of what is handed over.
    """

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.head_end: int | None = None
        self.expects_continue = False
        self.content_length: int | None = None
        self.chunked = False
        self._pos = 0  # chunked: where the next chunk-size line starts
        self._decoded = 0

    def feed(self, buf: bytearray) -> int | None:
        """The request's end offset in ``buf`` once complete, else ``None``.

        Raises:
            RequestTooLarge: the body is (or declares to be) over the limit.
            BadFraming: the head or the chunking cannot be delimited.
        """
        if self.head_end is None:
            idx = buf.find(b"\r\n\r\n")
            if idx < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise BadFraming("request head too large")
                return None
            if idx + 4 > MAX_HEAD_BYTES:
                raise BadFraming("request head too large")
            self.head_end = idx + 4
            self._parse_head(bytes(buf[:idx]))
            self._pos = self.head_end
        if self.chunked:
            return self._scan_chunks(buf)
        end = self.head_end + (self.content_length or 0)
        return end if len(buf) >= end else None

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version = lines[0].rsplit(b" ", 1)[-1].upper() if lines else b""
        lengths: list[bytes] = []
        codings: list[bytes] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            key = name.strip().lower()
            if key == b"content-length":
                lengths.append(value.strip())
            elif key == b"transfer-encoding":
                codings += [c.strip().lower() for c in value.split(b",") if c.strip()]
            elif key == b"expect":
                self.expects_continue = value.strip().lower() == b"100-continue" and version == b"HTTP/1.1"
        if codings:
            if lengths:
                raise BadFraming("both Content-Length and Transfer-Encoding")
            if codings[-1] != b"chunked":
                raise BadFraming("unsupported Transfer-Encoding (only chunked is accepted)")
            self.chunked = True
            return
        if lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit():
                raise BadFraming("invalid Content-Length")
            self.content_length = int(lengths[0])
            if self.content_length > self.max_body:
                raise RequestTooLarge()

    def _scan_chunks(self, buf: bytearray) -> int | None:
        while True:
            eol = buf.find(b"\r\n", self._pos)
            if eol < 0:
                if len(buf) - self._pos > MAX_CHUNK_LINE:
                    raise BadFraming("chunk-size line too long")
                return None
            size_text = bytes(buf[self._pos:eol]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadFraming("invalid chunk size") from None
            if size < 0:
                raise BadFraming("invalid chunk size")
            data_start = eol + 2
            if size == 0:
                if buf[data_start:data_start + 2] == b"\r\n":
                    return data_start + 2
                trailer_end = buf.find(b"\r\n\r\n", data_start)
                if trailer_end < 0:
                    if len(buf) - data_start > MAX_HEAD_BYTES:
                        raise BadFraming("trailers too large")
                    return None
                return trailer_end + 4
            if self._decoded + size > self.max_body:
                raise RequestTooLarge()
            if len(buf) < data_start + size + 2:
                return None
            if buf[data_start + size:data_start + size + 2] != b"\r\n":
                raise BadFraming("chunk not terminated by CRLF")
            self._decoded += size
            self._pos = data_start + size + 2
