"""`xllm run`'s Ollama flags through the real CLI against real servers: `--format json`, `--verbose`, `--keepalive`."""

from __future__ import annotations

import json
import re
import time

import pytest
from click.testing import CliRunner

from tests.server_fixtures import TINY, point_cli_at
from xllm_jupyter.cli.main import main
from xllm_jupyter.cli.run_flags import ReplyStats, go_duration
from xllm_jupyter.client import XllmClient
from xllm_jupyter.store import ModelStore

OBJECT_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def own(own_tiny_server, monkeypatch):
    """The module's server of its own, as the environment names it, its store as XLLM_HOME."""
    point_cli_at(own_tiny_server, monkeypatch)
    return own_tiny_server


def loaded(info) -> dict[str, dict]:
    with XllmClient(info.base_url, info.api_key) as c:
        return {m["id"]: m for m in c.loaded()}


# --------------------------------------------------------------------- --format
def test_run_format_json_constrains_the_answer(live):
    """`--format json` asks for a JSON object (response_format json_object), a JSON schema for an answer that matches
    it, as `ollama run --format` does; the answer is what the server gives that request."""
    with XllmClient(live.base_url, live.api_key) as c:
        want = c.chat([{"role": "user", "content": "Give me JSON"}], TINY, temperature=0, max_tokens=12,
                      response_format={"type": "json_object"})
        plain = c.chat([{"role": "user", "content": "Give me JSON"}], TINY, temperature=0, max_tokens=12)
        schema_want = c.chat([{"role": "user", "content": "Give me JSON"}], TINY, temperature=0, max_tokens=12,
                             response_format={"type": "json_schema", "json_schema": {"name": "f", "schema": OBJECT_SCHEMA}})
    assert want.startswith("{") and not plain.startswith("{")  # the constraint is what makes it JSON
    result = invoke("run", TINY, "Give", "me", "JSON", "-t", "0", "--max-tokens", "12", "--format", "json")
    assert result.exit_code == 0, result.output
    assert result.stdout == want + "\n"
    result = invoke("run", TINY, "Give me JSON", "-t", "0", "--max-tokens", "12", "--format", json.dumps(OBJECT_SCHEMA))
    assert result.exit_code == 0, result.output
    assert result.stdout == schema_want + "\n" and result.stdout.startswith('{"n":')
    for bad in ("yaml", "[1, 2]", "{not json"):
        result = invoke("run", TINY, "hi", "--format", bad)
        assert result.exit_code == 2 and "--format" in result.stderr and "JSON schema" in result.stderr, result.output


# --------------------------------------------------------------------- --verbose
def stats_of(stderr: str) -> dict[str, str]:
    """The `--verbose` summary lines (``name:  value``) on stderr."""
    return dict(re.findall(r"^([a-z ]+):\s+(.+)$", stderr, re.M))


def test_run_verbose_prints_timings_and_token_counts_after_the_answer(live):
    """`ollama run --verbose` prints total/load duration, prompt eval count/duration/rate and eval count/duration/rate
    on stderr after the answer; the counts are the server's usage for that request, the answer alone on stdout."""
    with XllmClient(live.base_url, live.api_key) as c:
        body = c.chat_completion([{"role": "user", "content": "Say hi"}], TINY, temperature=0, max_tokens=6)
    usage, want = body["usage"], body["choices"][0]["message"]["content"]
    assert usage["completion_tokens"] > 1
    result = invoke("run", TINY, "Say", "hi", "-t", "0", "--max-tokens", "6", "--verbose")
    assert result.exit_code == 0, result.output
    assert result.stdout == want + "\n"
    stats = stats_of(result.stderr)
    cached = ["prompt eval cached"] if "prompt eval cached" in stats else []  # the server's prefix cache held some
    assert list(stats) == ["total duration", "load duration", "prompt eval count", *cached, "prompt eval duration",
                           "prompt eval rate", "eval count", "eval duration", "eval rate"], result.stderr
    assert stats["prompt eval count"] == f"{usage['prompt_tokens']} token(s)"
    assert stats["eval count"] == f"{usage['completion_tokens']} token(s)"
    for key in ("total duration", "load duration", "prompt eval duration", "eval duration"):
        assert re.fullmatch(r"(\d+h)?(\d+m)?[\d.]+(ns|µs|ms|s)", stats[key]), stats
    for key in ("prompt eval rate", "eval rate"):
        assert re.fullmatch(r"\d+\.\d\d tokens/s", stats[key]) and float(stats[key].split()[0]) > 0, stats
    assert stats_of(invoke("run", TINY, "Say hi", "-t", "0", "--max-tokens", "6").stderr) == {}  # only when asked


def test_run_verbose_prints_the_servers_durations(live, monkeypatch):
    """The prompt's and the answer's durations and rates are the engine's, from the stream's ``timings`` (llama.cpp's):
    they were the CLI's clock, with the network and the wait in the queue in them. The total stays the CLI's."""
    seen = []
    real = XllmClient.stream_chunks

    def recording(self, *args, **kw):
        for chunk in real(self, *args, **kw):
            seen.append(chunk)
            yield chunk

    monkeypatch.setattr(XllmClient, "stream_chunks", recording)
    result = invoke("run", TINY, "Say", "hi", "-t", "0", "--max-tokens", "6", "--verbose")
    assert result.exit_code == 0, result.output
    timings, usage = seen[-1]["timings"], seen[-1]["usage"]
    stats = stats_of(result.stderr)
    assert stats["prompt eval duration"] == go_duration(timings["prompt_ms"] / 1e3)
    assert stats["prompt eval rate"] == f"{timings['prompt_n'] * 1e3 / timings['prompt_ms']:.2f} tokens/s"
    assert stats["eval duration"] == go_duration(timings["predicted_ms"] / 1e3)
    assert stats["eval rate"] == f"{timings['predicted_n'] * 1e3 / timings['predicted_ms']:.2f} tokens/s"
    assert stats["prompt eval count"] == f"{usage['prompt_tokens']} token(s)"  # the whole prompt, as Ollama counts it
    assert stats.get("prompt eval cached") == (f"{timings['cache_n']} token(s)" if timings["cache_n"] else None)


def test_the_summary_from_the_servers_timings_and_without_them():
    """With ``timings`` the durations are the server's and the prompt's rate counts the tokens it processed (its cache
    held the rest: Ollama's "prompt eval cached"); without (an older server) they are the CLI's clock's."""
    stats = ReplyStats(load_seconds=0.5)
    stats.start, stats.first, stats.end = 10.0, 10.5, 11.5
    stats.usage = {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 6}}
    stats.timings = {"cache_n": 6, "prompt_n": 4, "prompt_ms": 20.0, "predicted_n": 5, "predicted_ms": 100.0}
    assert stats.lines() == [
        "total duration:       2s", "load duration:        500ms", "prompt eval count:    10 token(s)",
        "prompt eval cached:   6 token(s)", "prompt eval duration: 20ms", "prompt eval rate:     200.00 tokens/s",
        "eval count:           5 token(s)", "eval duration:        100ms", "eval rate:            50.00 tokens/s"]
    stats.timings = {}
    assert stats.lines()[3:] == [
        "prompt eval cached:   6 token(s)", "prompt eval duration: 500ms", "prompt eval rate:     8.00 tokens/s",
        "eval count:           5 token(s)", "eval duration:        1s", "eval rate:            4.00 tokens/s"]


def test_run_verbose_in_the_interactive_chat_times_every_answer(live, monkeypatch):
    """In the chat each answer gets its summary; the load's time goes with the first only (it loaded before that)."""
    from xllm_jupyter.cli import chat

    monkeypatch.setattr(chat, "stdin_is_tty", lambda: True)
    result = invoke("run", TINY, "-t", "0", "--max-tokens", "4", "--verbose", input="hello\nagain\n/bye\n")
    assert result.exit_code == 0, result.output
    names = re.findall(r"^(?:>>> )?([a-z ]+):", result.stderr, re.M)  # (stdout is no terminal: prompts on stderr)
    assert names.count("total duration") == names.count("eval count") == names.count("prompt eval count") == 2
    assert names.count("load duration") == 1


def test_set_verbose_and_format_json_in_the_chat(live, monkeypatch):
    """`/set verbose`, `/set quiet`, `/set format json`, `/set noformat` in the chat, as in `ollama run`; they were
    "Unknown command '/set'"."""
    from xllm_jupyter.cli import chat

    monkeypatch.setattr(chat, "stdin_is_tty", lambda: True)
    lines = "/set format json\n/set verbose\nhello\n/set quiet\n/set noformat\nagain\n/set format yaml\n/set\n/bye\n"
    result = invoke("run", TINY, "-t", "0", "--max-tokens", "4", input=lines)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("{")  # the first answer, in JSON mode
    err = result.stderr
    for said in ("Set format to 'json' mode.", "Set 'verbose' mode.", "Set 'quiet' mode.", "Disabled format.",
                 "Invalid or missing format. For 'json' mode use '/set format json'", "Use /set verbose"):
        assert said in err, err
    assert err.count("total duration:") == 1 and err.count("load duration:") == 1  # the first answer only
    assert "Unknown command" not in err


def test_run_verbose_and_format_in_process(xllm_home, monkeypatch):
    """Without a server (--local) the in-process engine reports the same counts and follows --format json;
    --keepalive only says it has no server to keep the model loaded on."""
    monkeypatch.setenv("XLLM_HOME", str(xllm_home))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    reported, report = [], ReplyStats.report
    monkeypatch.setattr(ReplyStats, "report", lambda self: (reported.append(self), report(self)))
    result = invoke("run", TINY, "Give me JSON", "--local", "-t", "0", "--max-tokens", "8", "--format", "json",
                    "--verbose", "--keepalive", "5m")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("{")
    stats = stats_of(result.stderr)
    assert re.fullmatch(r"\d+ token\(s\)", stats["prompt eval count"]) and int(stats["prompt eval count"].split()[0]) > 3
    assert 1 <= int(stats["eval count"].split()[0]) <= 8
    timings = reported[0].timings  # the engine's, in the shape a server sends them
    assert stats["prompt eval duration"] == go_duration(timings["prompt_ms"] / 1e3)
    assert timings["predicted_n"] == int(stats["eval count"].split()[0])
    assert "--keepalive is for a server" in result.stderr


def test_go_duration_reads_as_go_prints_a_duration():
    assert [go_duration(s) for s in (0, 5e-7, 2.5e-5, 0.0125, 1.5, 61.25, 3725.0)] == \
        ["0s", "500ns", "25µs", "12.5ms", "1.5s", "1m1.25s", "1h2m5s"]


# --------------------------------------------------------------------- --keepalive
def test_run_keepalive_sets_how_long_the_model_stays_loaded(own):
    """`--keepalive 1h` is sent with the load and with each answer (keep_alive): the server keeps the model an hour
    past the answer, where its default is 5 minutes; a negative one keeps it loaded; a bad one is a usage error."""
    assert own.config.engine.keep_alive == "5m"
    result = invoke("run", TINY, "hi", "--max-tokens", "2", "--keepalive", "1h")
    assert result.exit_code == 0, result.output
    left = loaded(own)[TINY]["expires_at"] - time.time()
    assert 3500 < left <= 3600, left
    assert re.search(r"(59 minutes|1 hour) from now", invoke("ps").stdout)  # not the default's 4 minutes

    result = invoke("run", TINY, "--keepalive", "-1", input="")  # nothing piped: only loads, with its keep_alive
    assert result.exit_code == 0, result.output
    assert loaded(own)[TINY]["expires_at"] is None and "forever" in invoke("ps").stdout

    result = invoke("run", TINY, "hi", "--keepalive", "5x")
    assert result.exit_code == 2 and "--keepalive" in result.stderr and "5m" in result.stderr, result.output
    result = invoke("run", TINY, "hi", "--max-tokens", "2", "--keepalive", "5m")
    assert result.exit_code == 0, result.output
    assert 200 < loaded(own)[TINY]["expires_at"] - time.time() <= 300

    result = invoke("run", TINY, "hi", "--max-tokens", "2", "--keepalive", "0")  # unloaded once the answer is done
    assert result.exit_code == 0, result.output
    deadline = time.monotonic() + 60
    while TINY in loaded(own) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert TINY not in loaded(own)


def test_the_async_client_loads_with_a_keep_alive_too(own):
    """AsyncXllmClient.load takes the keep_alive XllmClient.load does (`xllm run --keepalive` sends it)."""
    import asyncio

    from xllm_jupyter.client import AsyncXllmClient

    async def load() -> None:
        async with AsyncXllmClient(own.base_url, own.api_key) as c:
            await c.load(TINY, keep_alive="2h")

    asyncio.run(load())
    assert 7100 < loaded(own)[TINY]["expires_at"] - time.time() <= 7200


def test_run_keepalive_with_a_user_key_is_one_clear_error(tmp_path_factory, tiny_llama_dir, monkeypatch):
    """Where keys have roles, keep_alive is an admin's (it decides for every user how long a model stays loaded): a
    user key's `--keepalive` ends in one line saying so, exit 1; without the flag the same key chats."""
    import dataclasses

    from tests.server_fixtures import make_test_config, running_server
    from xllm_jupyter.core.config import AuthConfig

    home = tmp_path_factory.mktemp("keepalive-roles")
    ModelStore(home).pull(str(tiny_llama_dir), TINY)
    cfg = dataclasses.replace(make_test_config(home, api_keys=("sk-user",)), auth=AuthConfig(admin_keys=("sk-admin",)))
    with running_server(cfg, ModelStore(home), TINY) as info:
        monkeypatch.setenv("XLLM_BASE_URL", info.base_url)
        monkeypatch.setenv("XLLM_API_KEY", "sk-user")
        result = invoke("run", TINY, "hi", "--max-tokens", "2", "--keepalive", "1h")
        assert result.exit_code == 1 and result.stdout == "", result.output
        err = result.stderr.strip()
        assert err.startswith("Error: keep_alive sets how long a model stays loaded") and "admin" in err, err
        assert len(err.splitlines()) == 1 and "Traceback" not in result.output
        assert invoke("run", TINY, "hi", "--max-tokens", "2").exit_code == 0
        result = invoke("--api-key", "sk-admin", "run", TINY, "hi", "--max-tokens", "2", "--keepalive", "1h")
        assert result.exit_code == 0, result.output
        with XllmClient(info.base_url, "sk-admin") as c:
            assert 3500 < {m["id"]: m for m in c.loaded()}[TINY]["expires_at"] - time.time() <= 3600
