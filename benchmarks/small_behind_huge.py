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

Reported per side: median ``alone_s``, ``behind_s``, their ratio, and the worst ``/health``.

    .venv/bin/python benchmarks/small_behind_huge.py     # writes benchmarks/results/small_behind_huge.{json,md}
    .venv/bin/python benchmarks/small_behind_huge.py --before e45f895 --users 7 --huge-mb 1 \
        --out benchmarks/results/small_behind_many_huge   # the prompt lane (34044fb): 7 users' 1 MB prompts
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
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_server import ROOT, TINY, ChildServer, commit, tiny_store, write_results  # noqa: E402
from loop_stall import HealthPoller, post  # noqa: E402

#: the last commit with every tokenizer call behind the model's lock
BEFORE = "e45f895~1"
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
    ap.add_argument("--delay", type=float, default=1.0, help="seconds between the huge and the small request")
    ap.add_argument("--poll-ms", type=float, default=50)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "small_behind_huge"))
    args = ap.parse_args()
    huge = json.dumps({"model": TINY, "prompt": "a " * int(args.huge_mb * 1e6 / 2), "max_tokens": 1}).encode()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        tiny_store(home)
        old = extract(args.before, Path(tmp) / "before")
        servers = {"before": OldServer(old, home, Path(tmp) / "before.log"),
                   "after": ChildServer(home, Path(tmp) / "after.log")}
        try:
            rounds: dict[str, list[dict]] = {side: [] for side in servers}
            for i in range(args.rounds):
                for side, server in servers.items():
                    rounds[side].append(one_round(server, huge, args.delay, args.poll_ms, args.users))
                    print(side, i, rounds[side][-1], flush=True)
        finally:
            for server in servers.values():
                server.stop()
    sums = {side: summary(r) for side, r in rounds.items()}
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
              "before": args.before, "machine": platform.platform(), "huge_bytes": len(huge),
              "delay_s": args.delay, "users": args.users, "summary": sums, "rounds": rounds}
    who = "another user's" if args.users == 1 else f"{args.users} other users'"
    lines = [f"# A small chat behind {who} {len(huge) / 1e6:.1f} MB prompts ({result['when']}, {result['commit']})", "",
             f"`.venv/bin/python benchmarks/small_behind_huge.py {' '.join(sys.argv[1:])}`; before = `{args.before}`; "
             f"medians of {args.rounds} alternating rounds; the small chat is sent {args.delay} s after the huge prompt.", "",
             "| code | small alone (s) | small behind huge (s) | ratio | first huge answer (s) | worst /health while huge (s) |",
             "|---|---|---|---|---|---|"]
    for side, s in sums.items():
        lines.append(f"| {side} | {s['alone_s']} | {s['behind_s']} | {s['ratio']}x | {s['huge_s']} | {s['worst_health_s']} |")
    write_results(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
