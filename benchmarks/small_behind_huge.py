#!/usr/bin/env python
"""How long another user's small chat takes while one user's huge prompt is tokenized, before and after a change.

Two ``xllm serve`` children serve the tests' tiny Llama (SmolLM2's real 49k tokenizer): one runs
this checkout's code ("after"), one the code of ``--before`` (a git revision, extracted with
``git archive`` into a temporary folder; default: the commit before the tokenizer lock was lifted).
Rounds alternate between them, so the shared machine's noise falls on both alike. A round:

1. a small chat (``max_tokens`` 1) alone: ``alone_s``;
2. a huge legacy completion (``--huge-mb`` MB of ``"a "``: seconds of tokenizing; the tiny model's
   context then refuses it with a 400) is posted, and ``--delay`` s later, while it is still being
   tokenized (``huge_s`` shows it ran on well past that), the same small chat: ``behind_s``;
3. ``GET /health`` is polled throughout (``--poll-ms``): the worst latency while the huge prompt ran
   says whether the IOLoop stayed responsive.

With ``--users N`` the huge prompt is posted by N users at once (more than asyncio's shared pool
of worker threads: 6 on 2 CPUs).

With ``--burst N`` a round is about two users' huge prompts instead (the servers get two API keys):
one user's huge prompt alone (``alone_s``), then one user posts N huge prompts at once and ``--delay`` s
later the other user posts one (``behind_s``: how long the second user's took; a FIFO lane held it
behind the whole burst, the fair lane behind about one of the burst's prompts).

With ``--embed N`` a round is about embeddings (the packaged all-minilm, two users): one user's one-input
embedding alone (``alone_s``), then the other user posts N texts of ~100 words at once and ``--delay`` s
later the first user's one input again (``behind_s``; a big batch's tokenizing and forward were one
piece of work on the model's one thread, now texts are tokenized off it and forwards take turns).

Reported per side: median ``alone_s``, ``behind_s``, their ratio, and the worst ``/health``.

    .venv/bin/python benchmarks/small_behind_huge.py     # writes benchmarks/results/small_behind_huge.{json,md}
    .venv/bin/python benchmarks/small_behind_huge.py --before e45f895 --users 7 --huge-mb 1 \
        --out benchmarks/results/small_behind_many_huge   # the prompt lane (34044fb): 7 users' 1 MB prompts
    .venv/bin/python benchmarks/small_behind_huge.py --before e2567a5~1 --burst 6 --huge-mb 0.5 --delay 0.3 \
        --out benchmarks/results/huge_behind_burst        # the fair lane (e2567a5): a huge prompt behind a burst
    .venv/bin/python benchmarks/small_behind_huge.py --before c5d2f8c~1 --embed 256 --delay 0.5 \
        --out benchmarks/results/embed_behind_batch       # embedding turns (c5d2f8c): one input behind a big batch
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, TINY, ChildServer, commit, tiny_store, write_results  # noqa: E402
from loop_stall import HealthPoller, post  # noqa: E402

#: the last commit with every tokenizer call behind the model's lock
BEFORE = "e45f895~1"
#: the two users' keys of a --burst run
KEYS = ("sk-bench-burst", "sk-bench-other")
SMALL = json.dumps({"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()


def extract(rev: str, into: Path) -> Path:
    """The package ``xllm_jupyter`` as of ``rev``, under ``into`` (read from git; the checkout is untouched)."""
    data = subprocess.run(["git", "archive", "--format=tar", rev, "xllm_jupyter"], cwd=ROOT, check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


class OldServer(ChildServer):
    """A child server running the package extracted under ``code`` instead of this checkout's."""

    def __init__(self, code: Path, *args, **kwargs):
        self.code = code
        super().__init__(*args, **kwargs)

    def command(self) -> list[str]:
        """Run from ``code``: ``python -c`` puts its working folder first on sys.path."""
        cmd = super().command()
        return [cmd[0], "-c", f"import os, sys; os.chdir({str(self.code)!r}); sys.path.insert(0, {str(self.code)!r}); "
                "from xllm_jupyter.cli.main import main; main()", *cmd[3:]]


class TwoUsers:
    """Mixed into a child server: it accepts both ``KEYS`` (two users; ``ready`` checks the first)."""

    def command(self) -> list[str]:
        """The server's command line, with the second key added."""
        return super().command() + ["--api-key", KEYS[1]]  # type: ignore[misc]


class TwoUserServer(TwoUsers, ChildServer):
    """This checkout's server, for two users."""


class TwoUserOldServer(TwoUsers, OldServer):
    """The old code's server, for two users."""


def timed_post(port: int, path: str, body: bytes) -> tuple[int, float]:
    """POST ``body``; its status and seconds."""
    start = time.perf_counter()
    status, _ = post(port, path, body)
    return status, time.perf_counter() - start


def one_round(server: ChildServer, huge: bytes, delay: float, poll_ms: float, users: int = 1) -> dict:
    """A small chat alone, then behind the huge prompt; the worst /health latency while the huge one ran."""
    poller = HealthPoller(server.port, poll_ms / 1000)
    poller.start()
    status, alone = timed_post(server.port, "/v1/chat/completions", SMALL)
    assert status == 200, status
    got: dict = {"status": [], "huge_s": []}

    def send_huge() -> None:
        status, seconds = timed_post(server.port, "/v1/completions", huge)
        got["status"].append(status)
        got["huge_s"].append(seconds)

    workers = [threading.Thread(target=send_huge) for _ in range(users)]
    got["start"] = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(delay)
    status, behind = timed_post(server.port, "/v1/chat/completions", SMALL)
    sent_at = time.perf_counter() - behind - got["start"]
    for worker in workers:
        worker.join()
    got["end"] = time.perf_counter()
    got["status"] = sorted(set(got["status"]))
    got["huge_s"] = min(got["huge_s"])  # the first huge answer: the small one was sent well before it
    poller.stopping.set()
    poller.join(60)
    health = poller.between(got["start"], got["end"])
    return {"alone_s": round(alone, 3), "behind_s": round(behind, 3), "small_status": status,
            "small_sent_after_huge_s": round(sent_at, 3), "huge_s": round(got["huge_s"], 3),
            "huge_status": got["status"], "worst_health_s": round(max(health), 4) if health else None}


def keyed_post(port: int, key: str, body: bytes) -> tuple[int, float]:
    """POST ``body`` to /v1/completions as the user of ``key``; its status and seconds."""
    start = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", content=body, timeout=600,
                   headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    return r.status_code, time.perf_counter() - start


def burst_round(server: ChildServer, huge: bytes, delay: float, burst: int) -> dict:
    """One user's huge prompt alone, then behind another user's burst of ``burst`` huge prompts."""
    status, alone = keyed_post(server.port, KEYS[1], huge)
    assert status == 400, status  # tokenized, then too long for the tiny model
    with ThreadPoolExecutor(burst) as pool:
        start = time.perf_counter()
        mine = [pool.submit(keyed_post, server.port, KEYS[0], huge) for _ in range(burst)]
        time.sleep(delay)
        other_status, behind = keyed_post(server.port, KEYS[1], huge)
        answers = [f.result() for f in mine]
    return {"alone_s": round(alone, 3), "behind_s": round(behind, 3),
            "burst_last_s": round(max(s for _, s in answers), 3), "since_burst_s": round(time.perf_counter() - start, 3),
            "huge_status": sorted({status, other_status, *(c for c, _ in answers)}), "huge_s": round(alone, 3),
            "worst_health_s": None}


EMBED_TEXT = " ".join(f"word{i % 50} and" for i in range(50))  # ~100 words: ~150 tokens, under MiniLM's 256


def embed_post(port: int, key: str, inputs: list[str]) -> tuple[int, float]:
    """POST an embeddings request of ``inputs`` to all-minilm as the user of ``key``; its status and seconds."""
    start = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": "all-minilm", "input": inputs}, timeout=600,
                   headers={"Authorization": f"Bearer {key}"})
    return r.status_code, time.perf_counter() - start


def embed_round(server: ChildServer, delay: float, batch: int) -> dict:
    """One input alone, then behind another user's batch of ``batch`` texts."""
    status, alone = embed_post(server.port, KEYS[1], ["hello there"])
    assert status == 200, status
    with ThreadPoolExecutor(1) as pool:
        start = time.perf_counter()
        big = pool.submit(embed_post, server.port, KEYS[0], [f"{i} {EMBED_TEXT}" for i in range(batch)])
        time.sleep(delay)
        small_status, behind = embed_post(server.port, KEYS[1], ["hello there"])
        big_status, big_s = big.result()
    assert small_status == big_status == 200, (small_status, big_status)
    return {"alone_s": round(alone, 3), "behind_s": round(behind, 3), "batch_s": round(big_s, 3),
            "since_batch_s": round(time.perf_counter() - start, 3), "huge_s": round(big_s, 3), "worst_health_s": None}


def summary(rounds: list[dict]) -> dict:
    """Medians over the rounds."""
    alone = statistics.median(r["alone_s"] for r in rounds)
    behind = statistics.median(r["behind_s"] for r in rounds)
    health = [r["worst_health_s"] for r in rounds if r["worst_health_s"] is not None]
    return {"alone_s": round(alone, 3), "behind_s": round(behind, 3), "ratio": round(behind / alone, 1),
            "huge_s": round(statistics.median(r["huge_s"] for r in rounds), 3),
            "worst_health_s": max(health) if health else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=BEFORE, help="git revision of the 'before' code (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--huge-mb", type=float, default=3.0)
    ap.add_argument("--users", type=int, default=1, help="users posting the huge prompt at once")
    ap.add_argument("--burst", type=int, default=0,
                    help="measure another user's huge prompt behind one user's burst of this many huge prompts")
    ap.add_argument("--embed", type=int, default=0,
                    help="measure another user's one-input embedding behind one user's batch of this many texts")
    ap.add_argument("--delay", type=float, default=1.0, help="seconds between the huge and the small request")
    ap.add_argument("--poll-ms", type=float, default=50)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "small_behind_huge"))
    args = ap.parse_args()
    huge = json.dumps({"model": TINY, "prompt": "a " * int(args.huge_mb * 1e6 / 2), "max_tokens": 1}).encode()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        tiny_store(home)
        if args.embed:
            from xllm_jupyter.store.store import ModelStore

            ModelStore(home).pull("all-minilm", "all-minilm")
        old = extract(args.before, Path(tmp) / "before")
        # a burst run tells two users apart by their API keys
        two = bool(args.burst or args.embed)
        keyed = {"api_key": KEYS[0]} if two else {}
        servers = {"before": (TwoUserOldServer if two else OldServer)(old, home, Path(tmp) / "before.log", **keyed),
                   "after": (TwoUserServer if two else ChildServer)(home, Path(tmp) / "after.log", **keyed)}
        try:
            rounds: dict[str, list[dict]] = {side: [] for side in servers}
            for i in range(args.rounds):
                for side, server in servers.items():
                    if args.embed:
                        rounds[side].append(embed_round(server, args.delay, args.embed))
                    elif args.burst:
                        rounds[side].append(burst_round(server, huge, args.delay, args.burst))
                    else:
                        rounds[side].append(one_round(server, huge, args.delay, args.poll_ms, args.users))
                    print(side, i, rounds[side][-1], flush=True)
        finally:
            for server in servers.values():
                server.stop()
    sums = {side: summary(r) for side, r in rounds.items()}
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
              "before": args.before, "machine": platform.platform(), "huge_bytes": len(huge),
              "delay_s": args.delay, "users": args.users, "burst": args.burst, "embed": args.embed, "summary": sums,
              "rounds": rounds}
    if args.burst or args.embed:
        write_results(args.out, result, burst_report(result, args, sums))
        return
    who = "another user's" if args.users == 1 else f"{args.users} other users'"
    lines = [f"# A small chat behind {who} {len(huge) / 1e6:.1f} MB prompts ({result['when']}, {result['commit']})", "",
             f"`.venv/bin/python benchmarks/small_behind_huge.py {' '.join(sys.argv[1:])}`; before = `{args.before}`; "
             f"medians of {args.rounds} alternating rounds; the small chat is sent {args.delay} s after the huge prompt.", "",
             "| code | small alone (s) | small behind huge (s) | ratio | first huge answer (s) | worst /health while huge (s) |",
             "|---|---|---|---|---|---|"]
    for side, s in sums.items():
        lines.append(f"| {side} | {s['alone_s']} | {s['behind_s']} | {s['ratio']}x | {s['huge_s']} | {s['worst_health_s']} |")
    write_results(args.out, result, "\n".join(lines) + "\n")


def burst_report(result: dict, args: argparse.Namespace, sums: dict) -> str:
    """The markdown report of a --burst run."""
    if args.embed:
        title = f"A user's one-input embedding behind another user's batch of {args.embed} texts"
        what, alone, behind = "embedding", "one input alone (s)", "behind the batch (s)"
    else:
        title = f"A user's {result['huge_bytes'] / 1e6:.1f} MB prompt behind another user's burst of {args.burst}"
        what, alone, behind = "prompt", "huge prompt alone (s)", "behind the burst (s)"
    lines = [f"# {title} ({result['when']}, {result['commit']})",
             "", f"`.venv/bin/python benchmarks/small_behind_huge.py {' '.join(sys.argv[1:])}`; before = `{args.before}`; "
             f"medians of {args.rounds} alternating rounds; the second user's {what} is sent {args.delay} s after.",
             "", f"| code | {alone} | {behind} | ratio |", "|---|---|---|---|"]
    for side, s in sums.items():
        lines.append(f"| {side} | {s['alone_s']} | {s['behind_s']} | {s['ratio']}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
