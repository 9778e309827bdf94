"""Helpers for the serving tests: a real gunicorn server on a free loopback port, a
uniform HTTP client over it or over Flask's test client, and the bad/unusual inputs.

Not a test module (no ``test_`` prefix); the serving test files import it from ``tests.support.serving``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from .net import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
GUNICORN_CONF = REPO_ROOT / "serving" / "gunicorn.conf.py"


# --------------------------------------------------------------------------- processes


def clean_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without any PLANTML_*/PROMETHEUS_* leftovers, plus overrides."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PLANTML_", "PROMETHEUS_", "prometheus_multiproc"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(overrides)
    return env


def children_of(pid: int) -> list[int]:
    """Live child process ids of ``pid`` (from /proc, no psutil needed)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces: split after it
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(entry.name))
    return sorted(kids)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy (returned) or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def accepted_by(pids: list[int], client: socket.socket) -> int | None:
    """The pid among ``pids`` holding the server side of ``client``'s TCP connection (accepted), else None.

    Read from /proc: the connection's server-side socket in /proc/net/tcp (its remote port is the
    client's local port), then which process has that socket inode open.
    """
    server_port = client.getpeername()[1]
    client_port = client.getsockname()[1]
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == client_port:
                inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    return None


def _status_mb(pid: int, field: str) -> float:
    """A memory field of ``/proc/<pid>/status`` (reported in kB) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} for pid {pid}")


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process in MiB (VmHWM, the high-water mark since it started)."""
    return _status_mb(pid, "VmHWM")


class MemoryCgroup:
    """A memory-limited cgroup (v1 memory controller, or v2) that test servers start inside.

    A hostile-input case that makes the server allocate without bound must hit this limit
    (the kernel then kills the offending worker inside the group, which the test sees as a
    worker restart) instead of the whole machine's memory: one PNG of 300 KB made a worker
    grow to 22 GB before the machine's OOM killer stepped in. ``available()`` is False
    where no writable memory controller exists; tests then skip rather than run unconfined.
    """

    V1_ROOT = Path("/sys/fs/cgroup/memory")
    V2_ROOT = Path("/sys/fs/cgroup")

    def __init__(self, name: str, limit_bytes: int) -> None:
        self.name = f"{name}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        self.limit_bytes = int(limit_bytes)
        self.path: Path | None = None
        self.v2 = False

    @classmethod
    def available(cls) -> bool:
        probe = cls("plantml-probe", 64 * 1024 * 1024)
        try:
            probe.create()
        except OSError:
            return False
        probe.remove()
        return True

    def create(self) -> "MemoryCgroup":
        if (self.V1_ROOT / "memory.limit_in_bytes").exists() or (self.V1_ROOT / "cgroup.procs").exists():
            path = self.V1_ROOT / self.name
            path.mkdir()
            (path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
            if (path / "memory.memsw.limit_in_bytes").exists():  # also cap swap where accounted
                try:
                    (path / "memory.memsw.limit_in_bytes").write_text(str(self.limit_bytes))
                except OSError:
                    pass
        elif "memory" in (self.V2_ROOT / "cgroup.controllers").read_text().split():
            path = self.V2_ROOT / self.name
            path.mkdir()
            self.v2 = True
            (path / "memory.max").write_text(str(self.limit_bytes))
            (path / "memory.swap.max").write_text("0")
        else:
            raise OSError("no memory cgroup controller")
        self.path = path
        return self

    def enter(self) -> None:
        """Move the calling process into the group (use as ``preexec_fn``: the child and all it forks)."""
        assert self.path is not None
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        """How many times the limit was hit hard (v1 ``failcnt`` counts reclaim too; v2 ``oom_kill``)."""
        assert self.path is not None
        if self.v2:
            for line in (self.path / "memory.events").read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
            return 0
        ctl = (self.path / "memory.oom_control").read_text() if (self.path / "memory.oom_control").exists() else ""
        for line in ctl.splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def peak_mb(self) -> float:
        """Peak memory of the whole group in MiB."""
        assert self.path is not None
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text()) / 1024 / 1024
        except (OSError, ValueError):
            return float("nan")

    def remove(self) -> None:
        if self.path is None:
            return
        for _ in range(50):
            try:
                self.path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        self.path = None


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (VmRSS)."""
    return _status_mb(pid, "VmRSS")


class GunicornServer:
    """``python -m gunicorn -c serving/gunicorn.conf.py serving.wsgi:app`` on 127.0.0.1."""

    def __init__(self, tmp_path: Path, *, workers: int = 2, env: dict[str, str] | None = None,
                 ready_timeout: float = 60.0, preexec_fn: Callable[[], None] | None = None) -> None:
        self.tmp_path = Path(tmp_path)
        self.port = free_port()
        self.metrics_dir = self.tmp_path / "prom"
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.tmp_path / "gunicorn.log"
        self.env = clean_env(**{
            "PLANTML_HOST": "127.0.0.1", "PLANTML_PORT": str(self.port), "PLANTML_WORKERS": str(workers),
            "PLANTML_ACCESS_LOG": "false", "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            "PLANTML_GRACEFUL_TIMEOUT": "20", **(env or {}),
        })
        self.ready_timeout = ready_timeout
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_after = float("nan")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def start(self, wait: bool = True) -> "GunicornServer":
        self._log = open(self.log_path, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "serving.wsgi:app"],
            cwd=str(self.tmp_path), env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=self.preexec_fn,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        import requests

        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url("/ready"), timeout=2).status_code == 200:
                    self.ready_after = time.monotonic() - self.started_at
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gunicorn not ready after {self.ready_timeout}s:\n{self.log()}")

    def workers(self) -> list[int]:
        return children_of(self.proc.pid) if self.proc else []

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the master and wait; returns its exit status (kills it after ``timeout``)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "GunicornServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class PrefixProxy:
    """A loopback reverse proxy that serves ``upstream`` under ``prefix``, as a rewriting ingress does.

    ``http://127.0.0.1:PORT/plantml/x`` is forwarded to ``upstream + "/x"``; any path
    outside the prefix is answered 404 here and recorded in ``outside``, so a page that
    builds an absolute URL shows up. Bounded: one upstream, a 30 s timeout per request.
    """

    HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
                  "proxy-connection", "content-length"}

    def __init__(self, upstream: str, prefix: str = "/plantml") -> None:
        self.upstream = upstream.rstrip("/")
        self.prefix = prefix.rstrip("/")
        self.seen: list[str] = []
        self.outside: list[str] = []
        self._server: Any = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{self.prefix}"

    def __enter__(self) -> "PrefixProxy":
        import http.server
        import threading
        import urllib.error
        import urllib.request

        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                if not self.path.startswith(proxy.prefix + "/"):
                    proxy.outside.append(self.path)
                    self.send_error(404, "outside the ingress prefix")
                    return
                proxy.seen.append(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy.HOP_BY_HOP}
                req = urllib.request.Request(proxy.upstream + self.path[len(proxy.prefix):], data=body,
                                             headers=headers, method=self.command)
                try:
                    resp = urllib.request.urlopen(req, timeout=30)
                except urllib.error.HTTPError as err:
                    resp = err
                payload = resp.read()
                self.send_response(resp.status if hasattr(resp, "status") else resp.code)
                for k, v in resp.headers.items():
                    if k.lower() not in proxy.HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="prefix-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()


# --------------------------------------------------------------------------- metrics


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text format -> ``{(name, frozenset(labels.items())): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def metric(samples: dict, metric_name: str, /, **labels: str) -> float:
    """Sum of the samples of ``metric_name`` whose labels include ``labels`` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == metric_name and want <= set(lab))


def counts_by_pid(metrics_dir: Path, sample_name: str, /, **labels: str) -> dict[int, float]:
    """Per-process values of a counter, read from the multiprocess files themselves.

    ``counter_<pid>.db`` holds what that process counted; a file exists from start-up
    whether or not the process counted anything, so only its *values* say who did the work.
    """
    from prometheus_client.mmap_dict import MmapedDict

    want = set(labels.items())
    out: dict[int, float] = {}
    for path in Path(metrics_dir).glob("counter_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        total = 0.0
        for key, value, _ts, _pos in MmapedDict.read_all_values_from_file(str(path)):
            _family, name, key_labels, _help = json.loads(key)
            if name == sample_name and want <= set(key_labels.items()):
                total += value
        out[pid] = out.get(pid, 0.0) + total
    return out


# --------------------------------------------------------------------------- one client API


@dataclass
class Reply:
    status: int
    body: Any  # parsed JSON, or text when not JSON
    content_type: str


def multipart(fields: list[tuple[str, str, bytes, str]]) -> tuple[bytes, str]:
    """Encode ``[(field, filename, data, content_type)]`` as multipart/form-data."""
    from urllib3 import encode_multipart_formdata

    body, ctype = encode_multipart_formdata([(f, (fn, data, ct)) for f, fn, data, ct in fields])
    return body, ctype


class Client:
    """Send raw requests to a Flask test client or a live server with the same call."""

    def __init__(self, flask_client: Any = None, base_url: str | None = None) -> None:
        self.flask_client = flask_client
        self.base_url = base_url

    def request(self, method: str, path: str, body: bytes = b"", content_type: str | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        headers = dict(headers or {})
        if content_type is not None:
            headers["Content-Type"] = content_type
        if self.flask_client is not None:
            r = self.flask_client.open(path, method=method, data=body, headers=headers)
            status, ctype, raw = r.status_code, r.headers.get("Content-Type", ""), r.get_data()
        else:
            import requests

            r = requests.request(method, self.base_url + path, data=body, headers=headers, timeout=60)
            status, ctype, raw = r.status_code, r.headers.get("Content-Type", ""), r.content
        if "json" in ctype:
            return Reply(status, json.loads(raw), ctype)
        return Reply(status, raw.decode(errors="replace"), ctype)

    def post_files(self, path: str, files: list[tuple[str, bytes]], field: str = "file",
                   ctype: str = "image/jpeg") -> Reply:
        body, content_type = multipart([(field, name, data, ctype) for name, data in files])
        return self.request("POST", path, body, content_type)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)


# --------------------------------------------------------------------------- images


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bytes(width: int, height: int, color_type: int = 2, bit_depth: int = 8, value: int = 90) -> bytes:
    """A complete, valid PNG of constant pixels, written without holding the raw image.

    Constant pixels compress about 1000:1, which is the point: a few hundred KB that
    decode to hundreds of MB. ``color_type``: 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA.
    """
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    sample = bytes([value]) * (bit_depth // 8)
    row = b"\x00" + sample * channels * width
    rows_per_block = max(1, (1 << 20) // len(row))
    comp = zlib.compressobj(9)
    parts = []
    done = 0
    block = row * rows_per_block
    while done < height:
        n = min(rows_per_block, height - done)
        parts.append(comp.compress(block if n == rows_per_block else row * n))
        done += n
    parts.append(comp.flush())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` (a decompression-bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_with_declared_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Patch the SOF0 marker of a baseline JPEG to declare another size."""
    i = jpeg.find(b"\xff\xc0")
    if i < 0:
        raise ValueError("no SOF0 marker")
    return jpeg[:i + 5] + struct.pack(">HH", height, width) + jpeg[i + 9:]


def unusual_images(base: Image.Image) -> dict[str, bytes]:
    """Valid but unusual encodings of one leaf image (each must be answered 200)."""
    rgb = base.convert("RGB")
    arr = np.asarray(rgb)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, rgb.width, dtype=np.uint8), (rgb.height, 1))))
    gray16 = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    palette_t = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_t.info["transparency"] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW
    wide = Image.fromarray(np.tile(arr[:4], (1, 30, 1))).resize((1600, 16))  # 100:1, the accepted maximum
    frames = [rgb, rgb.rotate(90)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "rgba_png": encode(rgba, "PNG"),
        "la_png": encode(rgb.convert("LA"), "PNG"),
        "grayscale_jpeg": encode(rgb.convert("L"), "JPEG"),
        "cmyk_jpeg": encode(rgb.convert("CMYK"), "JPEG"),
        "gray16_png": encode(gray16, "PNG"),
        "palette_png": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG"),
        "palette_transparent_png": encode(palette_t, "PNG"),
        "one_bit_png": encode(rgb.convert("1"), "PNG"),
        "exif_rotated_jpeg": encode(rgb.resize((64, 40)), "JPEG", exif=exif.tobytes()),
        "progressive_jpeg": encode(rgb, "JPEG", progressive=True, quality=80),
        "extreme_aspect_wide_png": encode(wide, "PNG"),
        "extreme_aspect_tall_jpeg": encode(wide.transpose(Image.Transpose.ROTATE_90), "JPEG"),
        "one_pixel_png": encode(rgb.resize((1, 1)), "PNG"),
        "bmp": encode(rgb, "BMP"),
        "webp": encode(rgb, "WEBP"),
        "tiff": encode(rgb, "TIFF"),
        "animated_gif": gif.getvalue(),
    }


@dataclass(frozen=True)
class BadCase:
    """One bad request and the answer it must get."""

    id: str
    build: Callable[[bytes], tuple[str, bytes, str | None]]  # good jpeg -> (path, body, content type)
    status: int
    reason: str  # the specific ``reason`` code the JSON error must carry


def _mp(field: str, data: bytes, name: str = "leaf.jpg", ctype: str = "image/jpeg") -> tuple[bytes, str]:
    return multipart([(field, name, data, ctype)])


def _infer(body: Any, raw: bool = False) -> tuple[str, bytes, str]:
    data = body if raw else json.dumps(body).encode()
    return "/v2/models/tiny-test-model/infer", data, "application/json"


def _bytes_tensor(items: list[str]) -> dict:
    return {"inputs": [{"name": "image", "shape": [len(items)], "datatype": "BYTES", "data": items}]}


def bad_cases(max_images: int = 32, max_upload_mb: float = 10, size: int = 32) -> list[BadCase]:
    """The bad-input suite (for the tiny bundle: model ``tiny-test-model``, ``size`` px)."""
    big = int(max_upload_mb * 1024 * 1024) + 1024
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return [
        BadCase("empty_raw_body", lambda j: ("/predict", b"", "image/jpeg"), 400, "empty"),
        BadCase("no_body_no_type", lambda j: ("/predict", b"", None), 400, "empty"),
        BadCase("empty_multipart_file", lambda j: ("/predict", *_mp("file", b"")), 400, "empty"),
        BadCase("text_as_jpeg", lambda j: ("/predict", b"this is not an image" * 10, "image/jpeg"), 400, "not_image"),
        BadCase("random_bytes_multipart", lambda j: ("/predict", *_mp("file", bytes(range(256)) * 8)), 400,
                "not_image"),
        BadCase("truncated_jpeg", lambda j: ("/predict", j[: len(j) // 2], "image/jpeg"), 400, "truncated"),
        BadCase("truncated_jpeg_multipart", lambda j: ("/predict", *_mp("file", j[:300])), 400, "truncated"),
        BadCase("png_bomb_header", lambda j: ("/predict", png_with_declared_size(60000, 60000), "image/png"), 400,
                "too_large"),
        BadCase("jpeg_bomb_header", lambda j: ("/predict", jpeg_with_declared_size(j, 50000, 50000), "image/jpeg"),
                400, "too_large"),
        BadCase("over_upload_limit", lambda j: ("/predict", b"\xff" * big, "image/jpeg"), 413, "payload_too_large"),
        BadCase("over_upload_limit_multipart", lambda j: ("/predict", *_mp("file", b"\xff" * big)), 413,
                "payload_too_large"),
        BadCase("text_plain", lambda j: ("/predict", b"hello", "text/plain"), 415, "unsupported_media_type"),
        BadCase("json_to_predict", lambda j: ("/predict", b'{"file": 1}', "application/json"), 415,
                "unsupported_media_type"),
        BadCase("form_urlencoded", lambda j: ("/predict", b"file=abc", "application/x-www-form-urlencoded"), 415,
                "unsupported_media_type"),
        BadCase("wrong_field_name", lambda j: ("/predict", *_mp("image", j)), 400, "no_file"),
        BadCase("too_many_images", lambda j: ("/predict", *multipart(
            [("file", f"{i}.jpg", j, "image/jpeg") for i in range(max_images + 1)])), 400, "too_many_images"),
        BadCase("too_many_images_batch", lambda j: ("/predict_batch", *multipart(
            [("files", f"{i}.jpg", j, "image/jpeg") for i in range(max_images + 1)])), 400, "too_many_images"),
        BadCase("one_bad_among_good", lambda j: ("/predict", *multipart(
            [("file", "good.jpg", j, "image/jpeg"), ("file", "bad.jpg", b"nope", "image/jpeg")])), 400, "not_image"),
        BadCase("malformed_multipart", lambda j: (
            "/predict", b"--xyz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
            "multipart/form-data; boundary=abc"), 400, "no_file"),
        BadCase("bad_top_k", lambda j: ("/predict?top_k=zero", j, "image/jpeg"), 400, "bad_parameter"),
        BadCase("top_k_out_of_range", lambda j: ("/predict?top_k=99", j, "image/jpeg"), 400, "bad_parameter"),
        BadCase("oip_malformed_json", lambda j: _infer(b'{"inputs": [', raw=True), 400, "malformed_json"),
        BadCase("oip_not_utf8", lambda j: _infer(b"\xff\xfe\x00{", raw=True), 400, "malformed_json"),
        BadCase("oip_deeply_nested", lambda j: _infer(b"[" * 100000 + b"]" * 100000, raw=True), 400,
                "malformed_json"),
        BadCase("oip_json_array", lambda j: _infer([1, 2, 3]), 400, "bad_tensor"),
        BadCase("oip_no_inputs", lambda j: _infer({"inputs": []}), 400, "bad_tensor"),
        BadCase("oip_two_inputs", lambda j: _infer({"inputs": [_bytes_tensor([b64(j)])["inputs"][0]] * 2}), 400,
                "bad_tensor"),
        BadCase("oip_wrong_datatype", lambda j: _infer(
            {"inputs": [{"name": "input", "shape": [1, 3, size, size], "datatype": "INT64",
                         "data": [0] * (3 * size * size)}]}), 400, "bad_tensor"),
        BadCase("oip_wrong_shape", lambda j: _infer(
            {"inputs": [{"name": "input", "shape": [1, 3, size + 1, size + 1], "datatype": "FP32",
                         "data": [0.0] * (3 * (size + 1) ** 2)}]}), 400, "bad_tensor"),
        BadCase("oip_shape_data_mismatch", lambda j: _infer(
            {"inputs": [{"name": "input", "shape": [2, 3, size, size], "datatype": "FP32",
                         "data": [0.0] * (3 * size * size)}]}), 400, "bad_tensor"),
        BadCase("oip_bad_shape_type", lambda j: _infer(
            {"inputs": [{"name": "input", "shape": "1x3", "datatype": "FP32", "data": [0.0]}]}), 400, "bad_tensor"),
        BadCase("oip_nan", lambda j: _infer(
            b'{"inputs": [{"name": "input", "shape": [1, 3, %d, %d], "datatype": "FP32", "data": [NaN%s]}]}'
            % (size, size, b", 0" * (3 * size * size - 1)), raw=True), 400, "bad_tensor"),
        BadCase("oip_strings_as_fp32", lambda j: _infer(
            {"inputs": [{"name": "input", "shape": [1, 3, size, size], "datatype": "FP32",
                         "data": ["a"] * (3 * size * size)}]}), 400, "bad_tensor"),
        BadCase("oip_ragged_fp32", lambda j: _infer(
            {"inputs": [{"name": "input", "shape": [1, 3, size, size], "datatype": "FP32",
                         "data": [[0.0] * 5, [0.0] * 4]}]}), 400, "bad_tensor"),
        BadCase("oip_zero_batch", lambda j: _infer(
            {"inputs": [{"name": "input", "shape": [0, 3, size, size], "datatype": "FP32", "data": []}]}), 400,
                "bad_tensor"),
        BadCase("oip_not_base64", lambda j: _infer(_bytes_tensor(["%%% not base64 %%%"])), 400, "bad_tensor"),
        BadCase("oip_base64_not_image", lambda j: _infer(_bytes_tensor([b64(b"plain text")])), 400, "not_image"),
        BadCase("oip_base64_truncated", lambda j: _infer(_bytes_tensor([b64(j[:200])])), 400, "truncated"),
        BadCase("oip_bytes_count_mismatch", lambda j: _infer(
            {"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": [b64(j)]}]}), 400, "bad_tensor"),
        BadCase("oip_too_many_images", lambda j: _infer(_bytes_tensor([b64(j)] * (max_images + 1))), 400,
                "too_many_images"),
        BadCase("oip_text_plain", lambda j: ("/v2/models/tiny-test-model/infer", b"{}", "text/plain"), 415,
                "unsupported_media_type"),
        BadCase("oip_unknown_model", lambda j: (
            "/v2/models/nope/infer", json.dumps(_bytes_tensor([b64(j)])).encode(), "application/json"), 404,
                "model_not_found"),
        BadCase("oip_unknown_output", lambda j: _infer({**_bytes_tensor([b64(j)]), "outputs": [{"name": "x"}]}), 400,
                "bad_tensor"),
    ]
