"""The load generators of ``benchmarks/serve_load.py``: wrk for peak throughput, asyncio for latency.

* :func:`run_wrk`: closed loop, ``wrk`` with one thread and a Lua script that POSTs the
  images in turn and prints its summary as one JSON line;
* :func:`run_open_loop`: a constant arrival rate from Python asyncio + aiohttp, latency
  measured from each request's *scheduled* send time, so queueing is not hidden;
* :func:`run_closed_loop`: the same generator as back-to-back clients (the peak phase
  where ``wrk`` is missing).

All target 127.0.0.1 and are bounded in time and in request count.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

WRK_SCRIPT = r"""
local paths = {%s}
local bodies = {}
local i = 0
init = function(args)
  for _, p in ipairs(paths) do
    local f = assert(io.open(p, "rb")); bodies[#bodies + 1] = f:read("*a"); f:close()
  end
end
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "/predict", {["Content-Type"] = "image/jpeg"}, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\": %%d, \"duration_us\": %%d, \"errors_connect\": %%d, \"errors_read\": %%d, " ..
    "\"errors_write\": %%d, \"errors_status\": %%d, \"errors_timeout\": %%d, \"p50_ms\": %%.3f, \"p95_ms\": %%.3f, " ..
    "\"p99_ms\": %%.3f, \"max_ms\": %%.3f}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000))
end
"""


def run_wrk(port: int, images: list[Path], duration: int, connections: int, tmp: Path) -> dict[str, Any]:
    """Closed-loop peak throughput with wrk (1 thread)."""
    script = tmp / "bench.lua"
    script.write_text(WRK_SCRIPT % ", ".join(json.dumps(str(p)) for p in images))
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s", str(script),
           f"http://127.0.0.1:{port}/predict"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    m = re.search(r"WRKJSON (\{.*\})", proc.stdout)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed: {proc.stdout}\n{proc.stderr}")
    r = json.loads(m.group(1))
    r["throughput_rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = sum(r[k] for k in r if k.startswith("errors_"))
    r["tool"] = f"wrk -t1 -c{connections} -d{duration}s"
    return r


async def _load(port: int, bodies: list[bytes], *, rate: float | None, duration: float, max_requests: int,
                concurrency: int) -> dict[str, Any]:
    import aiohttp

    url = f"http://127.0.0.1:{port}/predict"
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one(i: int, scheduled: float) -> None:
            async with sem:
                try:
                    async with session.post(url, data=bodies[i % len(bodies)],
                                            headers={"Content-Type": "image/jpeg"}) as resp:
                        await resp.read()
                        if resp.status != 200:
                            errors[f"status_{resp.status}"] = errors.get(f"status_{resp.status}", 0) + 1
                            return
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    return
            latencies.append(time.perf_counter() - scheduled)

        start = time.perf_counter()
        tasks = []
        i = 0
        if rate is not None:  # open loop: request i is due at start + i / rate
            while i < max_requests and (due := start + i / rate) < start + duration:
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, due)))
                i += 1
            await asyncio.gather(*tasks)
        else:  # closed loop: `concurrency` clients back to back
            async def client(k: int) -> None:
                n = k
                while time.perf_counter() - start < duration and n < max_requests:
                    await one(n, time.perf_counter())
                    n += concurrency
            await asyncio.gather(*(client(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat_ms = np.array(latencies) * 1000.0
    pct = (lambda q: float(np.percentile(lat_ms, q))) if len(lat_ms) else (lambda q: float("nan"))
    return {
        "offered_rps": rate, "sent": i if rate is not None else len(latencies) + sum(errors.values()),
        "completed": len(latencies), "errors": sum(errors.values()), "error_kinds": errors,
        "achieved_rps": len(latencies) / elapsed, "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "max_ms": float(lat_ms.max()) if len(lat_ms) else float("nan"),
        "tool": "python asyncio+aiohttp " + ("open loop (constant arrival rate)" if rate else "closed loop"),
    }


def run_open_loop(port: int, bodies: list[bytes], rate: float, duration: float, max_requests: int) -> dict[str, Any]:
    """Offer ``rate`` requests/s for ``duration`` s (at most ``max_requests``); latency from the scheduled time."""
    return asyncio.run(_load(port, bodies, rate=rate, duration=duration, max_requests=max_requests, concurrency=64))


def run_closed_loop(port: int, bodies: list[bytes], duration: float, connections: int) -> dict[str, Any]:
    """Peak throughput without wrk: ``connections`` clients back to back for ``duration`` s."""
    r = asyncio.run(_load(port, bodies, rate=None, duration=duration, max_requests=10**6, concurrency=connections))
    r["throughput_rps"] = r["achieved_rps"]
    return r
