#!/usr/bin/env python
"""Soak: many clients sharing one server with mixed, abandoned and bad requests; is it still whole afterwards?

One run starts ``xllm serve`` (the tests' tiny random Llama, own process, an API key) and lets
``--clients`` concurrent clients send a random mix for ``--seconds``: chat and completions, streamed
to the end or abandoned after a few chunks, requests cut by a client timeout, ``n`` with logprobs,
JSON-schema and forced tool calls, legacy ``echo``, Responses (streamed, chained), stop strings, and
bad requests (invalid JSON, unknown model, too long, bad values). Each reply is checked (status and
shape). Afterwards it checks what sharing depends on: the engine drains (nothing running or queued,
``xllm_requests_in_flight`` 0), no 5xx and no traceback in the server log, the server's memory growth
after warm-up, and that a greedy reference request gives the same tokens as before the soak (no
cache or batch state left corrupted).

    .venv/bin/python benchmarks/soak.py                  # writes benchmarks/results/soak.{json,md}
    .venv/bin/python benchmarks/soak.py --seconds 600 --clients 32
    .venv/bin/python benchmarks/soak.py --lifecycle --out benchmarks/results/soak_lifecycle

``--lifecycle`` adds what sharing a server's lifetime brings (soak_lifecycle.py): three user keys, a second model,
a LoRA adapter and the embedding model, and an admin who unloads them, sends keep_alive 0, deletes and pulls them
again and force-pulls meanwhile; requests those cut may end with a 503 to retry or a 404 (counted as cut, not
failed), and no user may have sequences or reserved tokens left afterwards.

Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, TINY, ChildServer, check_table, commit, report_head, tiny_store, write_results  # noqa: E402
from soak_lifecycle import (ADMIN_KEY, USER_KEYS, KeyedServer, admin_loop, is_cut, lifecycle_store,  # noqa: E402
                            server_env, usage_left, user_scenarios)

KEY = "soak-key"
#: the same weights under a second name, for ``--swap``
SECOND = "tiny-too"
WORDS = "the quick brown fox jumps over a lazy dog while seven cats watch from an old red barn".split()
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
REFERENCE = {"model": TINY, "messages": [{"role": "user", "content": "Count with me: one two three"}],
             "max_tokens": 32, "temperature": 0, "logprobs": True, "ignore_eos": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=90.0, help="how long the clients send")
    p.add_argument("--clients", type=int, default=12, help="concurrent clients")
    p.add_argument("--swap", action="store_true",
                   help=f"also send requests to a second model ({SECOND}) under a memory budget that holds one model at a time")
    p.add_argument("--lifecycle", action="store_true",
                   help="several user keys, and an admin unloading, deleting and pulling models under the requests")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--tiny", metavar="DIR", help="a local HF model dir to serve (default: build the tests' tiny Llama)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak"), help="output path without extension")
    return p.parse_args(argv)


class Failure(Exception):
    """A reply that is not what the scenario expects."""


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _chat(rng: random.Random, **extra: Any) -> dict[str, Any]:
    return {"model": TINY, "messages": [{"role": "user", "content": _prompt(rng, rng.randint(3, 60))}],
            "max_tokens": rng.randint(1, 40), **extra}


def _expect(response: httpx.Response, status: int) -> Any:
    if response.status_code != status:
        raise Failure(f"status {response.status_code}, wanted {status}: {response.text[:400]}")
    body = response.json()
    if status >= 400 and not {"message", "type", "param", "code"} <= set(body.get("error", {})):
        raise Failure(f"not an OpenAI error body: {response.text[:400]}")
    return body


async def _sse(client: httpx.AsyncClient, path: str, body: dict[str, Any], stop_after: int | None = None) -> list[Any]:
    """The data events of a stream (all of them, or the first ``stop_after`` before hanging up)."""
    events: list[Any] = []
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raise Failure(f"stream status {response.status_code}: {(await response.aread())[:400]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
                if stop_after is not None and len(events) >= stop_after:
                    return events  # leaving the block closes the connection: the server must cancel
    return events


# ------------------------------------------------------------------ scenarios
async def chat(client: httpx.AsyncClient, rng: random.Random) -> None:
    """A plain chat completion, greedy or sampled."""
    body = _chat(rng, temperature=rng.choice([0, 0.7, 1.0]), **({"seed": rng.randint(0, 99)} if rng.random() < 0.5 else {}))
    reply = _expect(await client.post("/v1/chat/completions", json=body), 200)
    used = reply["usage"]["completion_tokens"]
    if not isinstance(reply["choices"][0]["message"]["content"], str) or not 1 <= used <= body["max_tokens"]:
        raise Failure(f"bad reply: {reply}")


async def chat_stream(client: httpx.AsyncClient, rng: random.Random) -> None:
    """A chat stream read to the end, with usage."""
    body = _chat(rng, stream=True, stream_options={"include_usage": True})
    events = await _sse(client, "/v1/chat/completions", body)
    if events[-1] != "[DONE]" or not events[-2].get("usage") or events[-2]["usage"]["completion_tokens"] > body["max_tokens"]:
        raise Failure(f"stream ended badly: {events[-2:]}")


async def stream_abandoned(client: httpx.AsyncClient, rng: random.Random) -> None:
    """A chat stream the client hangs up on after a few chunks."""
    body = _chat(rng, stream=True, ignore_eos=True)
    body["max_tokens"] = 200
    await _sse(client, "/v1/chat/completions", body, stop_after=rng.randint(1, 4))


async def client_timeout(client: httpx.AsyncClient, rng: random.Random) -> None:
    """A long completion the client gives up on (its timeout closes the connection)."""
    body = _chat(rng, ignore_eos=True)
    body["max_tokens"] = 300
    try:
        await client.post("/v1/chat/completions", json=body, timeout=rng.uniform(0.05, 0.4))
    except httpx.TimeoutException:
        return


async def n_logprobs(client: httpx.AsyncClient, rng: random.Random) -> None:
    """Three choices with top-3 logprobs."""
    body = _chat(rng, n=3, logprobs=True, top_logprobs=3, temperature=0.8)
    reply = _expect(await client.post("/v1/chat/completions", json=body), 200)
    if len(reply["choices"]) != 3:
        raise Failure(f"{len(reply['choices'])} choices")
    for choice in reply["choices"]:
        content = choice["logprobs"]["content"]
        if not content or any(len(entry["top_logprobs"]) != 3 for entry in content):
            raise Failure(f"bad logprobs: {choice['logprobs']}")


async def json_schema(client: httpx.AsyncClient, rng: random.Random) -> None:
    """Constrained decoding: a finished reply is JSON of the schema."""
    body = _chat(rng, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}})
    body["max_tokens"] = 48
    choice = _expect(await client.post("/v1/chat/completions", json=body), 200)["choices"][0]
    if choice["finish_reason"] == "stop" and not isinstance(json.loads(choice["message"]["content"]).get("a"), int):
        raise Failure(f"not the schema: {choice['message']['content']!r}")


async def tools_required(client: httpx.AsyncClient, rng: random.Random) -> None:
    """A forced tool call: name and JSON arguments."""
    body = _chat(rng, tools=[TOOL], tool_choice="required")
    body["max_tokens"] = 64
    choice = _expect(await client.post("/v1/chat/completions", json=body), 200)["choices"][0]
    if choice["finish_reason"] == "tool_calls":
        call = choice["message"]["tool_calls"][0]["function"]
        if call["name"] != "get_weather" or not isinstance(json.loads(call["arguments"]), dict):
            raise Failure(f"bad call: {call}")


async def completions_echo(client: httpx.AsyncClient, rng: random.Random) -> None:
    """Legacy completions scoring a prompt (echo, logprobs, max_tokens 0)."""
    prompt = _prompt(rng, rng.randint(2, 40))
    body = {"model": TINY, "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0}
    choice = _expect(await client.post("/v1/completions", json=body), 200)["choices"][0]
    if choice["text"] != prompt or choice["logprobs"]["token_logprobs"][0] is not None:
        raise Failure(f"bad echo: {choice['text']!r}")


async def completions_stop(client: httpx.AsyncClient, rng: random.Random) -> None:
    """Legacy completions with stop strings."""
    body = {"model": TINY, "prompt": _prompt(rng, 8), "max_tokens": 24, "stop": [" the", "e"], "temperature": 0.9}
    text = _expect(await client.post("/v1/completions", json=body), 200)["choices"][0]["text"]
    if " the" in text or "e" in text:
        raise Failure(f"stop string in the text: {text!r}")


async def responses_stream(client: httpx.AsyncClient, rng: random.Random) -> None:
    """A streamed Responses request."""
    body = {"model": TINY, "input": _prompt(rng, 10), "max_output_tokens": 16, "stream": True, "store": False}
    events = await _sse(client, "/v1/responses", body)
    if events[-1].get("type") not in ("response.completed", "response.incomplete"):
        raise Failure(f"ended with {events[-1].get('type')}: {json.dumps(events[-1].get('response', {}).get('error'))[:400]}")


async def responses_chain(client: httpx.AsyncClient, rng: random.Random) -> None:
    """Two chained Responses (previous_response_id), the second truncating if need be."""
    first = _expect(await client.post("/v1/responses", json={"model": TINY, "input": _prompt(rng, 20), "max_output_tokens": 8}), 200)
    second = {"model": TINY, "input": _prompt(rng, 5), "previous_response_id": first["id"], "max_output_tokens": 8, "truncation": "auto"}
    reply = _expect(await client.post("/v1/responses", json=second), 200)
    if reply["previous_response_id"] != first["id"]:
        raise Failure("chain lost")
    _expect(await client.delete(f"/v1/responses/{first['id']}"), 200)


async def other_model(client: httpx.AsyncClient, rng: random.Random) -> None:
    """A chat on the second model (with ``--swap``, only one of the two fits: the engine swaps them)."""
    body = _chat(rng, stream=rng.random() < 0.5, model=SECOND)
    if body["stream"]:
        events = await _sse(client, "/v1/chat/completions", body)
        if events[-1] != "[DONE]":
            raise Failure(f"stream ended badly: {events[-2:]}")
    else:
        _expect(await client.post("/v1/chat/completions", json=body), 200)


async def bad_requests(client: httpx.AsyncClient, rng: random.Random) -> None:
    """Invalid JSON, an unknown model, a prompt past the context, out-of-range values: clear 4xx each."""
    kind = rng.randrange(5)
    if kind == 0:
        _expect(await client.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers={"Content-Type": "application/json"}), 400)
    elif kind == 1:
        _expect(await client.post("/v1/chat/completions", json={**_chat(rng), "model": "no-such-model"}), 404)
    elif kind == 2:
        _expect(await client.post("/v1/chat/completions", json={**_chat(rng), "messages": [{"role": "user", "content": _prompt(rng, 3000)}]}), 400)
    elif kind == 3:
        _expect(await client.post("/v1/chat/completions", json={**_chat(rng), "temperature": 5}), 400)
    else:
        _expect(await client.post("/v1/completions", json={"model": TINY, "prompt": "x", "n": 10_000}), 400)


SCENARIOS: dict[str, tuple[float, Callable[[httpx.AsyncClient, random.Random], Awaitable[None]]]] = {
    "chat": (4, chat), "chat stream": (4, chat_stream), "stream abandoned": (2, stream_abandoned),
    "client timeout": (1, client_timeout), "n=3 + logprobs": (1, n_logprobs), "json_schema": (1, json_schema),
    "tools required": (1, tools_required), "completions echo": (1, completions_echo), "completions stop": (1, completions_stop),
    "responses stream": (1, responses_stream), "responses chain": (1, responses_chain), "bad requests": (2, bad_requests),
}
#: with ``--swap``
SWAP_SCENARIOS = {**SCENARIOS, "second model (swaps)": (4, other_model)}


# ------------------------------------------------------------------ the run
class Tally:
    """Per scenario: runs, failures (first few kept), latencies."""

    def __init__(self, scenarios: dict[str, Any] | None = None, cuts_allowed: bool = False) -> None:
        self.scenarios = scenarios or SWAP_SCENARIOS
        self.cuts_allowed = cuts_allowed  # --lifecycle: a 503 to retry or a 404 from an unload or removal is no failure
        self.cut: collections.Counter[str] = collections.Counter()
        self.runs: collections.Counter[str] = collections.Counter()
        self.failures: dict[str, list[str]] = collections.defaultdict(list)
        self.failed: collections.Counter[str] = collections.Counter()
        self.seconds: dict[str, list[float]] = collections.defaultdict(list)

    def table(self) -> list[dict[str, Any]]:
        """One row per scenario."""
        return [{"scenario": name, "runs": self.runs[name], "failed": self.failed[name], "cut": self.cut[name],
                 "p50_s": round(statistics.median(self.seconds[name]), 3) if self.seconds[name] else None,
                 "first_failures": self.failures[name][:3]} for name in self.scenarios if name in SCENARIOS or self.runs[name]]


    async def run(self, name: str, client: httpx.AsyncClient, rng: random.Random) -> None:
        """Run scenario ``name`` once and count how it went."""
        start = time.monotonic()
        try:
            await self.scenarios[name][1](client, rng)
        except (Failure, httpx.HTTPError, ValueError, KeyError, TypeError, IndexError) as exc:
            text = f"{type(exc).__name__}: {exc}"
            if self.cuts_allowed and isinstance(exc, Failure) and is_cut(text):
                self.cut[name] += 1
            else:
                self.failed[name] += 1
                self.failures[name].append(text[:500])
        self.runs[name] += 1
        self.seconds[name].append(time.monotonic() - start)


def _client(url: str, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


async def client_loop(url: str, key: str, deadline: float, rng: random.Random, tally: Tally, swap: bool = False,
                      scenarios: dict[str, Any] | None = None) -> None:
    """One client: random scenarios (``scenarios``, else soak's own) until the deadline."""
    scenarios = scenarios or (SWAP_SCENARIOS if swap else SCENARIOS)
    names = list(scenarios)
    weights = [scenarios[n][0] for n in names]
    async with _client(url, key) as client:
        while time.monotonic() < deadline:
            await tally.run(rng.choices(names, weights)[0], client, rng)


async def once_each(url: str, key: str, seed: int = 0) -> Tally:
    """Every scenario once, one after another (a check that the scenarios hold against a server)."""
    tally, rng = Tally(), random.Random(seed)
    async with _client(url, key) as client:
        for name in SCENARIOS:
            await tally.run(name, client, rng)
    return tally


def one_model_budget(home: Path) -> int:
    """A memory budget of one and a half loaded tiny models (measured on a server of its own)."""
    probe = ChildServer(home, home.parent / "probe.log", api_key=KEY)
    try:
        stats = httpx.get(probe.url + "/admin/stats", headers=probe.headers, timeout=30).json()
    finally:
        probe.stop()
    return int(1.5 * next(m["memory_bytes"] for m in stats["models"] if m["id"] == TINY))


def reference(server: ChildServer) -> list[str]:
    """The greedy reference request's tokens, alone on the server."""
    reply = httpx.post(server.url + "/v1/chat/completions", json=REFERENCE, headers=server.headers, timeout=120)
    reply.raise_for_status()
    return [entry["token"] for entry in reply.json()["choices"][0]["logprobs"]["content"]]


def drained(server: ChildServer, timeout: float = 30.0) -> dict[str, Any]:
    """Engine figures once nothing runs or waits (or what they are at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(server.url + "/admin/stats", headers=server.headers, timeout=30).json()
        metrics = httpx.get(server.url + "/metrics", headers=server.headers, timeout=30).text
        in_flight = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith("xllm_requests_in_flight")) - 1  # the /metrics request itself
        state = {"running": stats["running"], "queued": stats["queued"], "requests_in_flight": in_flight}
        if not any(state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


async def soak(server: ChildServer, args: argparse.Namespace,
               lifecycle: tuple[dict[str, Path], list[str], dict[str, int]] | None = None) -> tuple[Tally, list[tuple[float, int]]]:
    """Run the clients (and with ``lifecycle``, (sources, failures, op counts), the admin); the server's RSS every 2 s
    meanwhile, as (seconds in, bytes)."""
    scenarios = user_scenarios(SCENARIOS, sys.modules[__name__]) if lifecycle else (SWAP_SCENARIOS if args.swap else SCENARIOS)
    tally = Tally(scenarios, cuts_allowed=lifecycle is not None)
    start = time.monotonic()
    deadline = start + args.seconds
    keys = USER_KEYS if lifecycle else (KEY,)
    tasks = [asyncio.create_task(client_loop(server.url, keys[i % len(keys)], deadline, random.Random(args.seed * 1000 + i),
                                             tally, args.swap, scenarios)) for i in range(args.clients)]
    if lifecycle:
        tasks.append(asyncio.create_task(admin_loop(server.url, deadline, random.Random(args.seed), *lifecycle)))
    rss: list[tuple[float, int]] = []
    while time.monotonic() < deadline:
        rss.append((round(time.monotonic() - start, 1), server.rss_bytes()))
        await asyncio.sleep(2.0)
    await asyncio.gather(*tasks)
    return tally, rss


def rss_growth(series: list[tuple[float, int]]) -> tuple[int, int]:
    """Median RSS over the second fifth of the run (after warm-up) and over the last fifth."""
    values = [v for _, v in series]
    fifth = max(1, len(values) // 5)
    return int(statistics.median(values[fifth:2 * fifth] or values)), int(statistics.median(values[-fifth:]))



def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown report."""
    lines = report_head(f"Soak: {result['clients']} clients for {result['seconds']:.0f} s (tiny Llama, CPU)", result)
    lines += ["| scenario | runs | failed | cut (503/404, --lifecycle) | p50 s |", "|---|---:|---:|---:|---:|"]
    for row in result["scenarios"]:
        lines.append(f"| {row['scenario']} | {row['runs']} | {row['failed']} | {row.get('cut', 0)} | {row['p50_s']} |")
    lines += ["", *check_table(result["checks"])]
    failures = [f"- {row['scenario']}: {f}" for row in result["scenarios"] for f in row["first_failures"]]
    return "\n".join(lines + (["", "First failures:", *failures] if failures else []) + [""])


def main(argv: list[str] | None = None) -> int:
    """Soak the server, check it, write the results; 1 when a check failed."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xllm-soak-") as tmp:
        home = Path(tmp) / "home"
        tiny_store(home, args.tiny)
        env = {}
        if args.swap:
            tiny_store(home, args.tiny, SECOND)
            env["XLLM_ENGINE_MEMORY_BUDGET_BYTES"] = str(one_model_budget(home))
        lifecycle = None
        if args.lifecycle:
            sources = lifecycle_store(home, Path(args.tiny) if args.tiny else home.parent / f"{home.name}-model")
            lifecycle = (sources, [], {})
            server: ChildServer = KeyedServer(home, Path(tmp) / "server.log", api_key=ADMIN_KEY, env={**env, **server_env()})
        else:
            server = ChildServer(home, Path(tmp) / "server.log", api_key=KEY, env=env)
        try:
            reference(server)  # the first run fills the prefix cache; later ones reuse it
            before = reference(server)
            tally, rss = asyncio.run(soak(server, args, lifecycle))
            idle = drained(server)
            leaked = usage_left(server.url) if lifecycle else {}
            after = reference(server)
        finally:
            server.stop()
        warm_rss, end_rss = rss_growth(rss)
        log = server.log_path.read_text(errors="replace")
    runs, failed = sum(tally.runs.values()), sum(tally.failed.values())
    fivexx = sum(1 for fails in tally.failures.values() for f in fails if "status 5" in f)
    checks = [
        {"name": "requests, all as expected", "value": f"{runs - failed}/{runs}", "ok": failed == 0 and runs > 0},
        {"name": "engine drained (running, queued, in flight)", "value": str(idle), "ok": not any(idle.values())},
        *([{"name": "users' sequences and reserved tokens left", "value": str(leaked or "none"), "ok": not leaked},
           {"name": "admin operations as expected", "value": f"{sum(lifecycle[2].values()) - len(lifecycle[1])}/"
            f"{sum(lifecycle[2].values())}" + (f" (first: {lifecycle[1][0]})" if lifecycle[1] else ""), "ok": not lifecycle[1]}]
          if lifecycle else []),
        {"name": "5xx replies", "value": str(fivexx), "ok": fivexx == 0},
        {"name": "tracebacks in the server log", "value": str(log.count("Traceback")), "ok": "Traceback" not in log},
        {"name": "greedy reference unchanged", "value": "same tokens" if after == before else f"{before[:8]} -> {after[:8]}",
         "ok": after == before},
        {"name": "server RSS, median of the 2nd -> last fifth of the run (MiB)", "value": f"{warm_rss / 2**20:.0f} -> {end_rss / 2**20:.0f}",
         "ok": end_rss < warm_rss * 1.25},
    ]
    result = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "clients": args.clients, "seconds": args.seconds, "seed": args.seed, "swap": args.swap,
              "lifecycle": args.lifecycle, "admin_ops": lifecycle[2] if lifecycle else None,
              "command": " ".join(["python benchmarks/soak.py", *(sys.argv[1:] if argv is None else argv)]),
              "scenarios": tally.table(), "checks": checks, "rss_series": rss}
    write_results(args.out, result, markdown(result))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
