#!/usr/bin/env python
"""What a freeze on one thread traps of other threads' work: cyclic garbage only an unfreezing collection frees.

``gc.freeze()`` moves every object the collector tracks into the permanent generation, whichever thread made
it. The server freezes at its start, at each backend's first load (its imports) and in every ``gc_freeze.collect()``
(unfreeze, collect, re-freeze: an unload of a frozen model, an exllama unload). Each round is a fresh process
with a real server (tests/server_fixtures.py) serving ``tiny``; the embedding host's first load (the first
/v1/embeddings request: its imports end in a freeze) then runs while, depending on the scenario:

    control             nothing else
    streams             4 chat streams (openai SDK) are in flight
    load_before_module  those streams, and a load of "tiny2" held after its tokenizer, before its torch module
    load_after_module   those streams, and a load of "tiny2" held after ``from_pretrained`` built its module
    load_fails          as load_after_module, then that load fails (an OSError, as damaged files raise)

then the streams end, tiny2 is unloaded through the engine and a plain ``gc.collect()`` runs (what the server
does). Reported: whether tiny2's module was frozen and is freed, how many unfreezing collections the server ran,
and the cyclic garbage still trapped (``gc.unfreeze()`` + ``gc.collect()`` with DEBUG_SAVEALL: count, bytes,
tensor bytes, types).

    .venv/bin/python benchmarks/gc_freeze_threads.py [SCENARIO,...]     # writes benchmarks/results/gc_freeze_threads.{json,md}
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, commit, write_results  # noqa: E402

SCENARIOS = ("control", "streams", "load_before_module", "load_after_module", "load_fails")

ROUND = r"""
import collections, gc, json, sys, tempfile, threading, weakref
from pathlib import Path
import openai, transformers
from tests.models import build_tiny_llama
from tests.server_fixtures import API_KEY, TINY, make_test_config, running_server
from xllm_jupyter.store.store import ModelStore

mode = sys.argv[1]
tmp = Path(tempfile.mkdtemp())
source = build_tiny_llama(tmp / "source")
store = ModelStore(tmp / "home")
store.pull(str(source), TINY)
store.pull(str(source), "tiny2")
tiny2 = str(store.resolve("tiny2").path)
held, go_on, module = threading.Event(), threading.Event(), []
original = transformers.AutoModelForCausalLM.from_pretrained.__func__

def holding(cls, path, *args, **kwargs):  # tiny2's load waits here while the embedding load freezes
    if str(path) == tiny2 and mode == "load_before_module":
        held.set(); go_on.wait(120)
    built = original(cls, path, *args, **kwargs)
    if str(path) == tiny2:
        module.append(weakref.ref(built))
        held.set(); go_on.wait(120)
        if mode == "load_fails":
            raise OSError("a failed read after the module was built")
    return built

def frozen(obj):
    return obj is not None and all(o is not obj for o in gc.get_objects())

out = {}
with running_server(make_test_config(tmp / "home"), store, TINY) as info:
    transformers.AutoModelForCausalLM.from_pretrained = classmethod(holding)
    client = openai.OpenAI(base_url=info.base_url, api_key=API_KEY)
    loading, streams = None, []
    if mode.startswith("load"):
        def load():
            try:
                info.call(info.engine.load("tiny2"), timeout=300)
            except Exception as exc:  # load_fails: the engine's answer
                out["load_error"] = type(exc).__name__
        loading = threading.Thread(target=load)
        loading.start()
        assert held.wait(120)
    if mode != "control":
        started = threading.Barrier(5)
        def stream(i):
            chunks = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": f"hi {i}"}],
                                                    max_tokens=200, stream=True, extra_body={"ignore_eos": True})
            for n, _ in enumerate(chunks):
                if n == 0:
                    started.wait(60)
        streams = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in streams:
            t.start()
        started.wait(60)
    before = gc.get_freeze_count()
    assert client.embeddings.create(model="all-minilm", input=["hello"]).data[0].embedding
    out["frozen_by_the_embedding_first_load"] = gc.get_freeze_count() - before
    out["tiny2_module_frozen"] = frozen(module[0]() if module else None)
    unfreezes, unfreeze = [0], gc.unfreeze
    def counted():
        unfreezes[0] += 1
        unfreeze()
    gc.unfreeze = counted
    go_on.set()
    for t in streams:
        t.join(120)
    if loading is not None:
        loading.join(300)
        if mode != "load_fails":
            info.call(info.engine.unload("tiny2"), timeout=120)
    gc.collect()
    gc.unfreeze = unfreeze
    out["unfreezing_collections_after"] = unfreezes[0]
    out["tiny2_module_alive_after_unload"] = bool(module and module[0]() is not None)
    gc.unfreeze()
    gc.set_debug(gc.DEBUG_SAVEALL)
    out["trapped_objects"] = gc.collect()
    gc.set_debug(0)
    import torch
    out["trapped_bytes"] = sum(sys.getsizeof(o) for o in gc.garbage)
    out["trapped_tensor_bytes"] = sum(o.untyped_storage().nbytes() for o in gc.garbage if isinstance(o, torch.Tensor))
    kinds = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
    out["trapped_types"] = dict(kinds.most_common(8))
    gc.garbage.clear()
    gc.freeze()
print("RESULT " + json.dumps(out))
"""


def run(mode: str) -> dict:
    """One scenario in a fresh interpreter; its RESULT line."""
    done = subprocess.run([sys.executable, "-c", ROUND, mode], cwd=ROOT, capture_output=True, text=True, timeout=600)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"scenario": mode, **json.loads(line[7:])}
    raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    wanted = sys.argv[1].split(",") if len(sys.argv) > 1 else SCENARIOS
    rows = [run(mode) for mode in wanted]
    result = {"benchmark": "gc_freeze_threads", "commit": commit(), "python": platform.python_version(),
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    lines = ["# gc_freeze_threads", "", f"commit {result['commit']}, {result['when']}", "",
             "| scenario | frozen by the freeze | tiny2 module frozen | unfreezing collections after | "
             "tiny2 module alive after unload | trapped cyclic garbage (objects / bytes / tensor bytes) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['frozen_by_the_embedding_first_load']} | {r['tiny2_module_frozen']} | "
                     f"{r['unfreezing_collections_after']} | {r['tiny2_module_alive_after_unload']} | "
                     f"{r['trapped_objects']} / {r['trapped_bytes']} / {r['trapped_tensor_bytes']} |")
    write_results(ROOT / "benchmarks" / "results" / "gc_freeze_threads", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
