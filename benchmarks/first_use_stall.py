#!/usr/bin/env python
"""How long the FIRST request of each kind stalls the server's IOLoop (one-time work: grammar tokenizer, loads, templates).

``loop_stall.py`` measures big bodies on a warm server; this measures what a fresh one does once: each
scenario starts ``xllm serve`` (a child process, this checkout's code) preloading ``smollm2`` (the
packaged SmolLM2: a real 49k-token vocabulary, which the grammar engine's tokenizer build scales
with), waits for one plain chat, then posts the scenario's requests in order while a thread polls
``GET /health`` every ``--poll-ms`` on its own keep-alive connection. Per request it reports the worst
``/health`` latency among the polls that overlapped it (and the 0.3 s after), and the request's time.

Scenarios (a fresh server each, since "first" happens once per process):

- ``json_schema``: the first ``response_format`` json_schema request (builds the grammar engine's
  tokenizer when that is lazy), then a second one with another schema;
- ``json_object``: the first ``response_format`` json_object request;
- ``forced tool``: the first request with ``tool_choice`` naming a function (a Lark grammar);
- ``other firsts``: the first chat with tools (auto: no grammar), the first Responses request, the
  first embeddings request (loads ``all-minilm``), the first request for ``tiny`` (a model load and its
  first chat template), and a second ``tiny`` request;
- ``LoRA``: the first request for ``smol-lora`` (a random LoRA on smollm2, attached on first use), then a second;
- ``copy``: the first request for ``tiny`` (loads it), then the first for ``tiny-copy`` (``xllm cp tiny
  tiny-copy``: hard links; its load finds tiny's grammar tokenizer built), then a second;
- ``unload``: loads ``tiny`` and unloads it (``POST /admin/models/unload``), then the same for ``all-minilm``:
  an unload's collections (two full ones, walking every frozen object, until a load stopped freezing its
  model: ``core/gc_freeze.py``);
- ``cold``: a server that preloads nothing (no ``-m``, no default model): the first request for ``tiny``
  is the process's first load (it imports torch and transformers), then a second;
- ``cold unload``: the same first load of ``tiny`` (the transformers backend's first), then its unload (the
  full collection of every frozen object while the first load froze its model: ``core/gc_freeze.py``);
- ``cold embeddings``: a server preloading nothing, the first embeddings request (its load imports torch),
  then the unload of ``all-minilm``;
- ``preload unload``: the unload of the preloaded ``smollm2`` (a GGUF; the start froze after its preload);
- ``tokenizer``: the first request for ``tiny-newtok`` (the tiny Llama with tokenizer files no loaded model was
  read from: its ``Tokenizer.from_file`` and the grammar engine's tokenizer build, both Rust holding the GIL),
  then its first json_schema request.
- ``reload``: the notebook pattern of a keep_alive running out: ``tiny-newtok`` is loaded, unloaded and asked for
  again (its reload: the tokenizer and grammar tokenizer of its first load, when kept, are not read or built
  again: backends/released_tokenizers.py), then a json_schema request.

``--before REV`` runs each round on this checkout's code and on ``REV``'s (``git archive``, as
``small_behind_huge.py`` does), alternating which goes first, into the same report.

    .venv/bin/python benchmarks/first_use_stall.py                 # writes benchmarks/results/first_use_stall.{json,md}
    .venv/bin/python benchmarks/first_use_stall.py --home DIR      # a store already holding them (else pulled)
    .venv/bin/python benchmarks/first_use_stall.py --scenarios 'cold unload' --before HEAD~1 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, ChildServer, commit, write_results  # noqa: E402
from loop_stall import HealthPoller, post  # noqa: E402
from small_behind_huge import extract  # noqa: E402

CHAT = "smollm2"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
#: the tiny Llama with another tokenizer_config.json (a longer model_max_length): tokenizer files no other model has
NEW_TOKENIZER = "tiny-newtok"


def chat(**extra) -> tuple[str, dict]:
    """A short smollm2 chat request with ``extra`` fields."""
    return "/v1/chat/completions", {"model": CHAT, "messages": ASK, "max_tokens": 8, **extra}


def schema_format(name: str, prop: str) -> dict:
    """A json_schema response_format with one required string property."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": {
        "type": "object", "properties": {prop: {"type": "string"}}, "required": [prop]}}}


#: scenario -> [(label, path, body)], posted in order on one fresh server
SCENARIOS: dict[str, list[tuple[str, str, dict]]] = {
    "json_schema": [
        ("first json_schema request", *chat(response_format=schema_format("city", "city"))),
        ("second json_schema request (another schema)", *chat(response_format=schema_format("town", "town"))),
    ],
    "json_object": [("first json_object request", *chat(response_format={"type": "json_object"}))],
    "forced tool": [("first forced tool call (tool_choice names a function)",
                     *chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}))],
    "other firsts": [
        ("first chat with tools (auto, no grammar)", *chat(tools=[WEATHER])),
        ("first Responses request", "/v1/responses", {"model": CHAT, "input": "Hi", "max_output_tokens": 8, "store": False}),
        ("first embeddings request (loads all-minilm)", "/v1/embeddings", {"model": "all-minilm", "input": "hello"}),
        ("first tiny request (loads tiny)", "/v1/chat/completions",
         {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        ("second tiny request", "/v1/chat/completions",
         {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
    ],
    "LoRA": [
        ("first smol-lora request (attaches a LoRA to smollm2)", "/v1/chat/completions",
         {"model": "smol-lora", "messages": ASK, "max_tokens": 8}),
        ("second smol-lora request", "/v1/chat/completions", {"model": "smol-lora", "messages": ASK, "max_tokens": 8}),
    ],
    "copy": [
        (f"first {name} request (loads {name})", "/v1/chat/completions",
         {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        for name in ("tiny", "tiny-copy")
    ] + [("second tiny-copy request", "/v1/chat/completions",
          {"model": "tiny-copy", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})],
    "unload": [  # (smollm2, preloaded, was frozen at the start; tiny and all-minilm load later, as models come and go)
        ("first tiny request (loads tiny)", "/v1/chat/completions",
         {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        ("unload tiny", "/admin/models/unload", {"model": "tiny"}),
        ("first embeddings request (loads all-minilm)", "/v1/embeddings", {"model": "all-minilm", "input": "hello"}),
        ("unload all-minilm", "/admin/models/unload", {"model": "all-minilm"}),
    ],
    "cold": [
        ("first tiny request (the process's first load: imports)", "/v1/chat/completions",
         {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        ("second tiny request", "/v1/chat/completions",
         {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
    ],
    "cold unload": [
        ("first tiny request (the process's first load: imports)", "/v1/chat/completions",
         {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        ("unload tiny (the backend's first-loaded model)", "/admin/models/unload", {"model": "tiny"}),
    ],
    "cold embeddings": [
        ("first embeddings request (the process's first load: imports)", "/v1/embeddings",
         {"model": "all-minilm", "input": "hello"}),
        ("unload all-minilm", "/admin/models/unload", {"model": "all-minilm"}),
    ],
    "preload unload": [("unload smollm2 (preloaded at the start)", "/admin/models/unload", {"model": CHAT})],
    "tokenizer": [
        (f"first {NEW_TOKENIZER} request (loads it: tokenizer files no loaded model has)", "/v1/chat/completions",
         {"model": NEW_TOKENIZER, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        (f"first {NEW_TOKENIZER} json_schema request", "/v1/chat/completions",
         {"model": NEW_TOKENIZER, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
          "response_format": schema_format("city", "city")}),
    ],
    "reload": [
        (f"first {NEW_TOKENIZER} request (loads it)", "/v1/chat/completions",
         {"model": NEW_TOKENIZER, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        (f"unload {NEW_TOKENIZER} (its keep_alive ran out)", "/admin/models/unload", {"model": NEW_TOKENIZER}),
        (f"{NEW_TOKENIZER} request after its unload (loads it again)", "/v1/chat/completions",
         {"model": NEW_TOKENIZER, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        (f"{NEW_TOKENIZER} json_schema request after the reload", "/v1/chat/completions",
         {"model": NEW_TOKENIZER, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
          "response_format": schema_format("city", "city")}),
    ],
}
#: a /health poll slower than this counts as a stall (its latency is summed per request: how long the loop stood)
STALLED = 0.05
#: scenarios whose server preloads nothing
COLD = {"cold", "cold unload", "cold embeddings"}


class ColdServer(ChildServer):
    """``xllm serve`` preloading nothing (no ``-m``, no default model): ready once ``/health`` answers."""

    def __init__(self, home: Path, log_path: Path):
        super().__init__(home, log_path, model="", env={"XLLM_ENGINE_DEFAULT_MODEL": ""})

    def command(self) -> list[str]:
        """The child's command line, without ``-m``."""
        return [sys.executable, "-c", "from xllm_jupyter.cli.main import main; main()",
                "serve", "--host", "127.0.0.1", "--port", str(self.port)]

    def ready(self, timeout: float) -> None:
        """Wait until ``/health`` answers 200."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not become ready")


class OldCode:
    """Mixed into a child server: it runs the package extracted under ``code`` (``--before``), not this checkout's."""

    code: Path

    def command(self) -> list[str]:
        """The server's command line, run from ``code``: ``python -c`` puts its working folder first on sys.path."""
        cmd = super().command()  # type: ignore[misc]
        return [cmd[0], "-c", f"import os, sys; os.chdir({str(self.code)!r}); sys.path.insert(0, {str(self.code)!r}); "
                "from xllm_jupyter.cli.main import main; main()", *cmd[3:]]


def server_class(cold: bool, code: Path | None) -> type[ChildServer]:
    """The child server for a scenario: cold or preloading ``CHAT``, this checkout's code or ``code``."""
    base: type[ChildServer] = ColdServer if cold else ChildServer
    if code is None:
        return base
    return type(f"Old{base.__name__}", (OldCode, base), {"code": code})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", help="an XLLM home whose store holds smollm2, all-minilm, tiny, tiny-copy, tiny-newtok and smol-lora "
                                  "(default: a temporary one)")
    p.add_argument("--rounds", type=int, default=2, help="fresh servers per scenario")
    p.add_argument("--poll-ms", type=float, default=5.0, help="interval between /health polls")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="which scenarios, comma-separated")
    p.add_argument("--before", help="a git revision: each round runs on its code too, interleaved with this checkout's")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "first_use_stall"),
                   help="output path without extension")
    return p.parse_args(argv)


def prepare_home(home: Path) -> None:
    """Pull smollm2, all-minilm, the tests' tiny Llama (its copy, and one with other tokenizer files) and a LoRA for
    smollm2 into ``home`` unless there."""
    from tests.models import build_tiny_llama
    from xllm_jupyter.store.store import ModelStore

    store = ModelStore(home)
    have = {m.name for m in store.list()}
    for name in ("smollm2", "all-minilm"):
        if name not in have:
            store.pull(name)
    if "tiny" not in have:
        store.pull(str(build_tiny_llama(home.parent / f"{home.name}-tiny")), "tiny")
    if "tiny-copy" not in have:
        store.create("tiny-copy", "FROM tiny\n")  # what xllm cp does: tiny's files, hard-linked
    if NEW_TOKENIZER not in have:
        source = build_tiny_llama(home.parent / f"{home.name}-{NEW_TOKENIZER}", seed=1)
        config_path = source / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "model_max_length": 8192}, indent=2))
        store.pull(str(source), NEW_TOKENIZER)
    if "smol-lora" not in have:
        store.pull(str(random_lora(store.show("smollm2").path, home.parent / f"{home.name}-lora")), "smol-lora", base="smollm2")


def random_lora(base: Path, out: Path) -> Path:
    """A random (non-zero) peft LoRA for the model at ``base``, saved at ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def run_scenario(home: Path, log: Path, steps: list[tuple[str, str, dict]], poll_ms: float,
                 cold: bool = False, code: Path | None = None) -> list[dict]:
    """One fresh server (``cold``: preloading nothing; ``code``: that package's): each step's status, seconds and
    worst /health latency."""
    cls = server_class(cold, code)
    server = cls(home, log) if cold else cls(home, log, model=CHAT)
    try:
        poller = HealthPoller(server.port, poll_ms / 1000)
        poller.start()
        time.sleep(1.0)  # a quiet second first: the idle latency
        idle = poller.between(0, time.perf_counter())
        rows = [{"label": "idle, 1 s", "status": None, "seconds": None, "worst_s": round(max(idle), 4)}]
        for label, path, body in steps:
            start = time.perf_counter()
            status, _ = post(server.port, path, json.dumps(body).encode())
            seconds = time.perf_counter() - start
            time.sleep(0.3)  # work (or a collection) right after the answer still counts
            window = poller.between(start, time.perf_counter())
            stalled = sum(lat for lat in window if lat > STALLED)
            rows.append({"label": label, "status": status, "seconds": round(seconds, 3), "worst_s": round(max(window), 4),
                         "stalled_s": round(stalled, 4)})
            print(f"  {label}: status {status}, {seconds:.2f} s, worst /health {max(window):.3f} s, "
                  f"stalled {stalled:.3f} s", flush=True)
        poller.stopping.set()
        poller.join(10)
        return rows
    finally:
        server.stop()


def markdown(result: dict) -> str:
    """Per request, the worst /health latency and the summed stalled polls of each round, and the median time."""
    lines = [f"# first_use_stall ({result['when']}, {result['commit']}, {result['cpus']} CPUs, "
             f"{result['rounds']} fresh servers per scenario, /health every {result['poll_ms']} ms)", "",
             f"`{result['command']}`", "",
             "| scenario | request | status | request time | worst /health latency per round | "
             f"polls over {STALLED * 1000:.0f} ms, summed, per round |", "|---|---|---|---|---|---|"]
    codes = [("", result["runs"])] if not result.get("before") else [
        ("after: ", result["runs"]), (f"before ({result['before']}): ", result["runs_before"])]
    for scenario in result["runs"]:
        for prefix, runs in codes:
            lines.extend(scenario_rows(scenario, prefix, runs[scenario]))
    return "\n".join(lines) + "\n"


def scenario_rows(scenario: str, prefix: str, rounds: list[list[dict]]) -> list[str]:
    """The table rows of one scenario's rounds (``prefix`` before each request's label)."""
    lines = []
    for i, row in enumerate(rounds[0]):
        worsts = [r[i]["worst_s"] for r in rounds]
        stalls = [r[i].get("stalled_s", 0.0) for r in rounds]
        times = sorted(r[i]["seconds"] for r in rounds if r[i]["seconds"] is not None)
        statuses = sorted({r[i]["status"] for r in rounds if r[i]["status"] is not None})
        lines.append(f"| {scenario} | {prefix}{row['label']} | {', '.join(map(str, statuses))} | "
                     f"{f'{times[len(times) // 2]:.2f} s' if times else ''} | "
                     f"{', '.join(f'{w:.3f}' for w in worsts)} s | "
                     f"{', '.join(f'{x:.3f}' for x in stalls)} s |")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Run every scenario ``--rounds`` times, write the results."""
    args = parse_args(argv)
    result: dict = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
                    "cpus": os.cpu_count(), "python": platform.python_version(), "rounds": args.rounds,
                    "poll_ms": args.poll_ms, "runs": {},
                    "command": " ".join(["python benchmarks/first_use_stall.py", *(sys.argv[1:] if argv is None else argv)])}
    if args.before:
        result["before"], result["runs_before"] = args.before, {}
    with tempfile.TemporaryDirectory(prefix="xllm-first-use-") as tmp:
        home = Path(args.home) if args.home else Path(tmp) / "home"
        prepare_home(home)
        old = extract(args.before, Path(tmp) / "before") if args.before else None
        for scenario in args.scenarios.split(","):
            print(scenario, flush=True)
            result["runs"][scenario] = []
            if old is not None:
                result["runs_before"][scenario] = []
            for i in range(args.rounds):
                codes = [("after", None)] if old is None else [("after", None), ("before", old)][:: 1 if i % 2 == 0 else -1]
                for name, code in codes:  # (interleaved, alternating which goes first: the machine's load varies)
                    print(f" {name}, round {i + 1}", flush=True)
                    log = Path(tmp) / f"server-{scenario}-{name}-{i}.log".replace(" ", "-")
                    rows = run_scenario(home, log, SCENARIOS[scenario], args.poll_ms, scenario in COLD, code)
                    result["runs" if code is None else "runs_before"][scenario].append(rows)
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
