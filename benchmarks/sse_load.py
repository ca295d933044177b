"""A lean load generator for streamed (SSE) completions: raw sockets, split across processes.

An httpx client spends a few hundred microseconds of its own CPU per request and per
chunk. At 64 streams and thousands of tokens per second one Python client process
saturates its core, sends its requests late and reads chunks late, and the benchmark
then charges the client's delay to the server (time to first token grew with the
stream count, uniformly, though the server sat idle). This client does as little as a
client can:

- every connection is opened before the clock starts;
- at one agreed moment every worker writes its pre-encoded requests back to back;
- responses are read as bytes; content chunks are counted by a byte pattern per SSE
  event, and the token count comes from the final usage chunk (``include_usage``); a
  request that also asks for ``continuous_usage_stats`` gets the server's running count
  on every chunk, kept per read (``made``: the count when that read's content came);
- ``procs`` worker processes share the streams, so on a many-core machine the client
  is never the bottleneck.

Times are ``time.monotonic()``, which all processes on one machine share.

    recs, client_cpu_s = run_level(url, "/v1/completions", bodies, procs=4)
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from urllib.parse import urlparse

#: an SSE event carrying generated text (completion "text" or chat "content"), not an empty one
CONTENT = re.compile(rb'"(?:text|content)":"(?!")')
USAGE = re.compile(rb'"completion_tokens":(\d+)')
CACHED = re.compile(rb'"cached_tokens":(\d+)')
#: seconds the workers get to start and open their connections before the agreed moment
SETUP_SECONDS = 1.5
#: seconds a response may go without a byte before the level fails (a hung server must not hang the run)
READ_TIMEOUT = 180.0


def request_bytes(host: str, port: int, path: str, body: dict, api_key: str | None = None) -> bytes:
    """One HTTP/1.1 POST, closing the connection after the response."""
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    return head.encode() + data


async def _read(reader: asyncio.StreamReader, rec: dict) -> None:
    """Read one response to its end, stamping each read that carries content events (and, in ``made``, the server's
    running token count on its last content event: None where the chunks carry no usage)."""
    pending = b""
    status = None
    while True:
        data = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)
        if not data:
            break
        now = time.monotonic()
        if status is None:
            status = int(data[9:12]) if data.startswith(b"HTTP/1.") else 0
        pending += data
        events = pending.split(b"\n\n")
        pending = events.pop()  # a partial event waits for the next read
        content = [event for event in events if CONTENT.search(event)]
        if content:
            rec["times"].append((now, len(content)))
            running = USAGE.search(content[-1])
            rec["made"].append(int(running.group(1)) if running else None)
            if rec["first"] is None:
                rec["first"] = now
        for event in events:
            found = USAGE.search(event)
            if found:
                rec["tokens"] = int(found.group(1))
                cached = CACHED.search(event)
                rec["cached"] = int(cached.group(1)) if cached else 0
    rec["end"] = time.monotonic()
    rec["status"] = status


async def _streams(url: str, path: str, bodies: list[dict], start_at: float, keys: list[str | None]) -> dict:
    u = urlparse(url)
    conns = [await asyncio.open_connection(u.hostname, u.port) for _ in bodies]
    payloads = [request_bytes(u.hostname, u.port, path, body, key) for body, key in zip(bodies, keys)]
    recs = [{"start": 0.0, "first": None, "end": 0.0, "tokens": 0, "cached": 0, "times": [], "made": [], "status": None}
            for _ in bodies]
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    cpu0 = time.process_time()
    for (_, writer), payload, rec in zip(conns, payloads, recs):
        rec["start"] = time.monotonic()
        writer.write(payload)
    await asyncio.gather(*(_read(reader, rec) for (reader, _), rec in zip(conns, recs)))
    cpu = time.process_time() - cpu0
    for _, writer in conns:
        writer.close()
    return {"recs": recs, "cpu_s": cpu}


def run_level(url: str, path: str, bodies: list[dict], procs: int = 1,
              api_key: str | Sequence[str] | None = None) -> tuple[list[dict], float]:
    """Send ``bodies`` (each a streamed request with usage) at once from ``procs`` processes.

    ``api_key`` is one key for every request, or a sequence of one key per body (many users).
    Returns one record per stream (start, first content, end, tokens, cached prompt tokens, status, ``times``:
    (monotonic time, content events in that read), ..., and ``made``: the server's token count at each of those
    reads, from ``continuous_usage_stats``, else None) and the CPU seconds the workers spent from the agreed
    moment on.
    """
    keys = [api_key] * len(bodies) if api_key is None or isinstance(api_key, str) else list(api_key)
    if len(keys) != len(bodies):
        raise ValueError("api_key: give one key, or one per body")
    procs = max(1, min(procs, len(bodies)))
    start_at = time.monotonic() + SETUP_SECONDS + 0.01 * len(bodies)
    shares = [(bodies[i::procs], keys[i::procs]) for i in range(procs)]
    workers = [subprocess.Popen([sys.executable, __file__, url, path, repr(start_at)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for _ in shares]
    for worker, (share, share_keys) in zip(workers, shares):
        worker.stdin.write(json.dumps({"bodies": share, "keys": share_keys}))  # keys never go on a command line
        worker.stdin.close()
    recs, cpu = [], 0.0
    for worker in workers:
        out = worker.stdout.read()
        if worker.wait() != 0:
            raise RuntimeError("a load-generator worker failed")
        result = json.loads(out)
        recs.extend(result["recs"])
        cpu += result["cpu_s"]
    bad = [r["status"] for r in recs if r["status"] != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} streams failed (HTTP status {bad[0]})")
    return recs, cpu


def span(recs: list[dict]) -> float:
    """Seconds from the first request written to the last response ended (the level's wall time)."""
    return max(r["end"] for r in recs) - min(r["start"] for r in recs)


def main() -> None:
    """Worker mode: ``URL PATH START_AT``; bodies and key as JSON on stdin, records and CPU seconds as JSON on stdout."""
    url, path, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
    job = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(_streams(url, path, job["bodies"], start_at, job["keys"]))))


if __name__ == "__main__":
    main()
