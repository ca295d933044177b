"""The benchmarks' own tools: the lean SSE load generator and the GPU-profile stand-in model."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from xllm_jupyter.core.types import FinishReason, SamplingParams, SequenceJob

from .fake_backend import FakeModel
from .server_fixtures import TINY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_like  # noqa: E402
import sse_load  # noqa: E402


def stream_body(max_tokens: int, **extra) -> dict:
    return {"model": TINY, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **extra}


def test_load_generator_counts_every_token_of_concurrent_streams(xllm_server):
    bodies = [stream_body(12, prompt=f"Stream {i} says") for i in range(3)]
    bodies.append(stream_body(9, messages=[{"role": "user", "content": "hi"}]))
    recs, client_cpu = sse_load.run_level(xllm_server.root, "/v1/completions", bodies[:3], procs=2,
                                          api_key=xllm_server.api_key)
    chat, _ = sse_load.run_level(xllm_server.root, "/v1/chat/completions", bodies[3:], api_key=xllm_server.api_key)
    assert [r["tokens"] for r in recs] == [12, 12, 12] and chat[0]["tokens"] == 9
    for rec in recs + chat:
        assert rec["status"] == 200
        assert rec["start"] < rec["first"] <= rec["end"]
        assert rec["times"][0][0] == rec["first"]
        # every content event is counted once, and a chunk holds at least one token
        assert 1 <= sum(n for _, n in rec["times"]) <= rec["tokens"]
    assert client_cpu >= 0


def test_load_generator_fails_loudly_on_an_error_status(xllm_server):
    with pytest.raises(RuntimeError, match="status 401"):
        sse_load.run_level(xllm_server.root, "/v1/completions", [stream_body(4, prompt="x")])  # no key


def test_load_generator_sends_each_body_with_its_own_key(xllm_server):
    bodies = [stream_body(4, prompt=f"user {i}") for i in range(3)]
    keys = [xllm_server.api_key, "not-a-key", xllm_server.api_key]
    with pytest.raises(RuntimeError, match=r"^1 streams failed \(HTTP status 401\)"):
        sse_load.run_level(xllm_server.root, "/v1/completions", bodies, procs=2, api_key=keys)
    recs, _ = sse_load.run_level(xllm_server.root, "/v1/completions", bodies, procs=2, api_key=[xllm_server.api_key] * 3)
    assert [r["tokens"] for r in recs] == [4, 4, 4]
    with pytest.raises(ValueError, match="one per body"):
        sse_load.run_level(xllm_server.root, "/v1/completions", bodies, api_key=keys[:2])


def test_gpu_like_model_makes_every_token_and_honours_cancel():
    profile = gpu_like.GpuProfile.parse("launches=3,launch_us=5,base_us=2000,per_seq_us=0,prefill_us=0")
    assert profile.launches == 3 and profile.base_us == 2000 and profile.per_seq_us == 0
    model = gpu_like.GpuLikeModel(FakeModel("fake"), profile)
    model.add(SequenceJob(1, (5, 6), 4, SamplingParams(temperature=0.0), frozenset()))
    model.add(SequenceJob(2, (5, 6), 10, SamplingParams(temperature=0.0), frozenset()))
    t0 = time.perf_counter()
    first = model.step()
    assert time.perf_counter() - t0 >= 0.002  # the "GPU" wait
    assert [e.job_id for e in first] == [1, 2] and all(e.text == model._text for e in first)
    model.cancel(2)
    events = first + [e for _ in range(3) for e in model.step()]
    by_job = {1: [e for e in events if e.job_id == 1], 2: [e for e in events if e.job_id == 2]}
    assert len(by_job[1]) == 4 and by_job[1][-1].finish is FinishReason.LENGTH
    assert by_job[1][-1].completion_tokens == 4
    assert by_job[2][-1].finish is FinishReason.CANCELLED and by_job[2][-1].token_id is None
    assert model.active_jobs() == 0


@pytest.mark.exllama
@pytest.mark.parametrize(("backend", "users"), [("exllamav3", 2), ("exllamav2", 0)])
def test_gpu_serving_stand_in_measures_raw_and_server_over_the_librarys_generator(backend, users, tiny_llama_dir,
                                                                                  tmp_path):
    # benchmarks/gpu/cpu_check.sh runs this: gpu_serving.py's raw and server paths over the library's own
    # generator (forward stood in), which otherwise first meet the library on a GPU lease
    from tests.page_generator import require

    require(backend)
    import gpu_serving

    out = tmp_path / "stand_in.json"
    assert gpu_serving.main(["--stand-in=base_us=200,per_seq_us=20", "--model", f"tiny={tiny_llama_dir}",
                             "--backends", backend, "--streams", "1,3", "--v2-streams", "1,3", "--new-tokens", "12",
                             "--prompt-tokens", "40", "--client-procs", "2", "--users", str(users),
                             "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["params"]["stand_in"]["per_seq_us"] == 20.0 and "no GPU" in report["device"]
    rows = {row["streams"]: row for row in report["rows"]}
    assert sorted(rows) == [1, 3]
    for streams, row in rows.items():
        assert (row["backend"], row["users"]) == (backend, users)
        runs = 3 if streams == 1 else 1  # the 1-stream level runs --single-repeats times, pooled
        assert row["raw"]["runs"] == row["server"]["runs"] == runs
        assert row["raw"]["tokens"] == row["server"]["tokens"] == 12 * streams * runs
        assert row["raw"]["short_streams"] == row["server"]["short_streams"] == 0
        # every pass has its own prompts: nothing comes from the prefix cache on either side
        assert row["raw"]["cached_prompt_tokens"] == row["server"]["cached_prompt_tokens"] == 0
        assert row["ratio"] > 0 and row["server"]["ttft_p50_ms"] > 0
        # inter-token latency per token on both sides (the server's running counts were read), not chunk gaps
        assert not row["raw"]["itl_is_chunk_gap"] and not row["server"]["itl_is_chunk_gap"]
    assert "the model's forward replaced by a GPU engine's step costs" in out.with_suffix(".md").read_text()


def test_soak_scenarios_hold_against_the_server_and_their_checks_can_fail(xllm_server):
    import asyncio

    import httpx
    import soak

    tally = asyncio.run(soak.once_each(xllm_server.root, xllm_server.api_key))
    assert [row["failed"] for row in tally.table()] == [0] * len(soak.SCENARIOS), tally.table()
    assert sum(tally.runs.values()) == len(soak.SCENARIOS)
    with pytest.raises(soak.Failure):
        soak._expect(httpx.Response(200, json={}), 400)
    with pytest.raises(soak.Failure):  # a 4xx that is not an OpenAI error body
        soak._expect(httpx.Response(400, json={"detail": "no"}), 400)
    wrong_key = asyncio.run(soak.once_each(xllm_server.root, "not-the-key"))
    assert wrong_key.failed["chat"] == 1 and "status 401" in wrong_key.failures["chat"][0]


def test_fuzz_cases_pass_against_the_server_and_the_fuzz_checks_can_fail(raw):
    """A slice of benchmarks/fuzz_api.py's cases through the session server breaks none of its rules; broken replies do."""
    import fuzz_api
    import fuzz_cases

    picked = [c for c in fuzz_cases.field_cases() if c.name.startswith(("logit_bias", "stream_options", "stop-stream[0]"))]
    picked += [c for c in fuzz_cases.schema_cases() if c.name.endswith((":ref-loop", ":enum-mixed", ":pattern-invalid"))]
    picked += [c for c in fuzz_cases.body_cases() if c.name.startswith(("body empty", "body deep array", "body duplicate"))]
    assert len(picked) > 40
    for case in picked:
        r = raw.request(case.method, case.path, content=case.body, headers=case.headers)
        assert fuzz_api.reply_problems(case, r.status_code, r.headers.get("content-type", ""), r.content) == [], (case.name, r.text[:300])
    case = fuzz_cases.Case("x", "POST", "/v1/chat/completions")
    broken = [
        (500, "application/json", b'{"error": {"message": "m", "type": "server_error", "param": null, "code": null}}'),
        (400, "application/json", b'{"detail": "no"}'),
        (400, "text/html", b"<html>"),
        (400, "application/json", json.dumps({"error": {"message": 'Traceback: File "/work/x.py"', "type": "t", "param": None,
                                                        "code": None}}).encode()),
        (400, "application/json", json.dumps({"error": {"message": "a" * 5000, "type": "t", "param": None, "code": None}}).encode()),
        (422, "application/json", b'{"error": {"message": "m", "type": "t", "param": null, "code": null}}'),
        (200, "application/json", b'{"schema": NaN}'),
        (200, "text/event-stream", b'data: {"choices": []}\n\n'),  # no [DONE]
    ]
    for status, ctype, body in broken:
        assert fuzz_api.reply_problems(case, status, ctype, body), (status, body[:60])


def test_a_lifecycle_soak_counts_only_unload_and_removal_answers_as_cuts():
    from soak_lifecycle import is_cut

    assert is_cut("Failure: status 503, wanted 200: The model 'tiny' was unloaded while this request ran; retry")
    assert is_cut('Failure: error event: {"error": {"code": "model_not_found", "message": "was removed from the server"}}')
    assert is_cut("Failure: status 404, wanted 200: {\"error\": {\"code\": \"model_not_found\"}}")
    # what the chaos run found must stay failures
    assert not is_cut("Failure: status 500, wanted 200: model_load_failed: its files are damaged")
    assert not is_cut("Failure: status 400, wanted 200: Model 'tiny-too' is damaged; pull it again with force")
    assert not is_cut("Failure: status 500, wanted 200: was unloaded while this request ran")  # a 500 never is
