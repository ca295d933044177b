"""Usage survives a restart (quotas.usage_file): a daily quota cannot be reset by restarting."""

from __future__ import annotations

import dataclasses
import json
import logging

import httpx
import openai
import pytest

from tests.server_fixtures import API_KEY, TINY, make_test_config, running_server
from xllm_jupyter.core.config import QuotaConfig, load_config
from xllm_jupyter.core.errors import RateLimited
from xllm_jupyter.server.auth import key_id
from xllm_jupyter.server.usage import Caller, UsageTracker
from xllm_jupyter.server.usage_file import read_usage, usage_path

MSG = [{"role": "user", "content": "hi"}]


def _config(home, **quotas):
    cfg = make_test_config(home)
    return dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, home=home), quotas=QuotaConfig(**quotas))


def _usage(srv) -> dict:
    with httpx.Client(base_url=srv.root, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        r = c.get("/admin/usage")
    assert r.status_code == 200, r.text
    return {row["user"]: row for row in r.json()["data"]}


def _sdk(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def test_daily_quota_and_totals_survive_a_restart(tmp_path, tiny_catalog):
    cfg = _config(tmp_path, tokens_per_day=5)  # usage_file: auto -> <home>/usage.json
    user = key_id(API_KEY)
    with running_server(cfg, tiny_catalog, TINY) as srv:
        reply = _sdk(srv).chat.completions.create(model=TINY, messages=MSG, max_tokens=4)
        spent = reply.usage.total_tokens
        assert spent > 5  # the prompt alone is over the quota: the next request is refused
        with pytest.raises(openai.RateLimitError, match="Daily token quota"):
            _sdk(srv).chat.completions.create(model=TINY, messages=MSG, max_tokens=2)
    saved = read_usage(tmp_path / "usage.json")  # written when the server stopped
    assert saved[user]["tokens_today"] == spent and "in_flight" not in saved[user]

    with running_server(cfg, tiny_catalog, TINY) as srv:
        row = _usage(srv)[user]
        assert (row["total_tokens"], row["tokens_today"], row["requests"]) == (spent, spent, 1)
        assert row["rejected"] == {"tokens_per_day": 1} and row["limits"]["tokens_per_day"] == 5
        with httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
            r = c.post("/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 2})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and "Daily token quota" in err["message"]


def test_a_corrupt_usage_file_is_survived(tmp_path, tiny_catalog, caplog):
    (tmp_path / "usage.json").write_text('{"version": 1, "users": {"x": ')  # cut short mid-write by hand
    cfg = _config(tmp_path, tokens_per_day=1000)
    with caplog.at_level(logging.WARNING, logger="xllm_jupyter.server"):
        with running_server(cfg, tiny_catalog, TINY) as srv:
            assert _usage(srv) == {}
            reply = _sdk(srv).chat.completions.create(model=TINY, messages=MSG, max_tokens=2)
    assert "usage file" in caplog.text and "unreadable" in caplog.text
    saved = json.loads((tmp_path / "usage.json").read_text())  # replaced by a good file
    assert saved["users"][key_id(API_KEY)]["prompt_tokens"] == reply.usage.prompt_tokens


def test_usage_file_setting_auto_off_and_path(tmp_path):
    def path(shared=False, **quotas):
        cfg = load_config(tmp_path / "none.yaml", env={"XLLM_HOME": str(tmp_path)}, overrides={"quotas": quotas})
        return usage_path(cfg, shared=shared)

    assert path() is None  # no daily quota, not the hub: nothing to protect
    assert path(shared=True) == tmp_path / "usage.json"  # the hub service keeps usage by default
    assert path(user_tokens_per_day=["alice=10"]) == tmp_path / "usage.json"
    assert path(tokens_per_day=10, usage_file="off") is None
    assert path(shared=True, usage_file="") is None
    assert path(usage_file=str(tmp_path / "elsewhere.json")) == tmp_path / "elsewhere.json"


def test_old_days_are_pruned_and_saves_are_throttled_off_the_caller(tmp_path):
    now = [1_000_000.0]
    file = tmp_path / "usage.json"
    t = UsageTracker(QuotaConfig(tokens_per_day=100), clock=lambda: now[0], path=file)
    t.release(t.admit(Caller("alice", ("staff",))))
    t.charge("alice", 30, 10)
    assert not file.exists()  # charging never writes: the saver thread does, every few seconds
    t.close()
    assert read_usage(file)["alice"]["tokens_today"] == 40
    assert file.stat().st_mode & 0o077 == 0  # owner-only: it names every user, as /admin/usage does for admins

    now[0] += 86400  # the next UTC day: yesterday's count is pruned, totals are kept
    t2 = UsageTracker(QuotaConfig(tokens_per_day=100), clock=lambda: now[0], path=file)
    row = t2.snapshot("alice")[0]
    assert (row["tokens_today"], row["total_tokens"], row["groups"]) == (0, 40, ["staff"])
    t2.charge("bob", 1, 1)
    t2.close()
    saved = read_usage(file)
    assert saved["alice"]["tokens_today"] == 0 and saved["alice"]["day"] == "" and saved["bob"]["tokens_today"] == 2


def test_a_stream_refused_by_the_quota_hold_is_a_real_429(tmp_path, tiny_catalog):
    # the hold is taken when the request reaches the engine, after the stream was returned: its
    # refusal was the first event of a 200 stream (the SDK raised a bare APIError and never retried)
    cfg = _config(tmp_path, tokens_per_day=400, usage_file="off")
    body = {"model": TINY, "messages": MSG, "max_tokens": 300, "stream": True, "ignore_eos": True}
    with running_server(cfg, tiny_catalog, TINY) as srv, httpx.Client(timeout=60) as c:
        with c.stream("POST", srv.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            while not next(lines).startswith("data: "):
                pass  # generating: it holds its prompt + 300 of the 400
            with pytest.raises(openai.RateLimitError) as refused:
                _sdk(srv).chat.completions.create(model=TINY, messages=MSG, max_tokens=300, stream=True)
            assert refused.value.status_code == 429 and int(refused.value.response.headers["Retry-After"]) >= 1
            with pytest.raises(openai.RateLimitError):
                _sdk(srv).completions.create(model=TINY, prompt="hi", max_tokens=300, stream=True)
            with pytest.raises(openai.RateLimitError):
                _sdk(srv).responses.create(model=TINY, input="hi", max_output_tokens=300, stream=True)


def test_servers_sharing_a_usage_file_add_their_counts_up(tmp_path, tiny_catalog):
    # xllm serve and the Jupyter extension on one home share <home>/usage.json: each rewrote it from its own
    # counts, so the last to save dropped the other's and a restart forgot them (a daily quota bypassed)
    cfg = _config(tmp_path, tokens_per_day=100_000)
    user = key_id(API_KEY)
    with running_server(cfg, tiny_catalog, TINY) as one, running_server(cfg, tiny_catalog, TINY) as two:
        spent = [_sdk(srv).chat.completions.create(model=TINY, messages=MSG, max_tokens=2, seed=1).usage.total_tokens
                 for srv in (one, two, two)]
    saved = read_usage(tmp_path / "usage.json")[user]
    assert (saved["requests"], saved["tokens_today"]) == (3, sum(spent))
    with running_server(cfg, tiny_catalog, TINY) as srv:
        row = _usage(srv)[user]
        assert (row["requests"], row["tokens_today"], row["total_tokens"]) == (3, sum(spent), sum(spent))


def test_a_shared_usage_file_is_merged_and_adopted(tmp_path):
    now = [1_000_000.0]
    file = tmp_path / "usage.json"
    quota = QuotaConfig(tokens_per_day=100)
    one = UsageTracker(quota, clock=lambda: now[0], path=file)
    two = UsageTracker(quota, clock=lambda: now[0], path=file)
    one.release(one.admit(Caller("alice", ("staff",))))
    one.charge("alice", 60, 10)
    one._saver.flush()
    two._saver.flush()  # nothing of its own to save: it takes in what the other server saved
    assert two.snapshot("alice")[0]["tokens_today"] == 70
    two.release(two.admit(Caller("alice", ("staff",))))
    two.charge("alice", 30, 5)
    two.charge("bob", 1, 1)
    with pytest.raises(RateLimited):  # 105 of 100 between them
        two.admit(Caller("alice", ("staff",)))
    one.close()
    two.close()
    saved = read_usage(file)
    assert (saved["alice"]["tokens_today"], saved["alice"]["requests"], saved["bob"]["tokens_today"]) == (105, 2, 2)
    assert saved["alice"]["rejected"] == {"tokens_per_day": 1} and saved["alice"]["groups"] == ["staff"]
    assert two.snapshot("alice")[0]["in_flight"] == 0

    now[0] += 86400  # the next day: one server's save drops yesterday's count, never the totals
    three = UsageTracker(quota, clock=lambda: now[0], path=file)
    three.charge("alice", 3, 0)
    three.close()
    saved = read_usage(file)
    assert (saved["alice"]["tokens_today"], saved["alice"]["prompt_tokens"]) == (3, 93)

    file.write_text("not json")  # a corrupt file is replaced by the server's counts, as before
    three.charge("carol", 1, 0)
    three.close()
    assert set(read_usage(file)) == {"alice", "bob", "carol"} and read_usage(file)["alice"]["tokens_today"] == 3


def test_a_user_moved_to_an_account_by_one_server_is_not_counted_twice(tmp_path):
    # a hub user's counts saved under the bare name move to their account at its first request (on one server):
    # the other server, which had read them under the name too, wrote them back there
    file = tmp_path / "usage.json"
    old = UsageTracker(QuotaConfig(tokens_per_day=100), path=file)
    old.charge("carol", 5, 5)
    old.close()
    one = UsageTracker(QuotaConfig(tokens_per_day=100), path=file)
    two = UsageTracker(QuotaConfig(tokens_per_day=100), path=file)
    one.release(one.admit(Caller("carol/1", name="carol")))  # takes the name's counts over
    one.charge("carol/1", 1, 1)
    one.close()
    two.charge("dave", 1, 0)
    two.close()
    saved = read_usage(file)
    assert sorted(saved) == ["carol/1", "dave"] and saved["carol/1"]["tokens_today"] == 12
    assert [row["account"] for row in two.snapshot()] == ["carol/1", "dave"]
    two.charge("dave", 1, 0)
    two.close()
    assert sorted(read_usage(file)) == ["carol/1", "dave"] and read_usage(file)["carol/1"]["tokens_today"] == 12


def test_a_charge_while_a_save_adopts_another_servers_counts_is_saved(tmp_path, monkeypatch):
    # the saver read "nothing changed" and then cleared the flag after a stat of the file: a charge made in
    # between (another thread) was adopted into memory but never written, not even by the final save at shutdown
    import xllm_jupyter.server.usage_file as usage_file

    file = tmp_path / "usage.json"
    one = UsageTracker(QuotaConfig(tokens_per_day=100), path=file)
    two = UsageTracker(QuotaConfig(tokens_per_day=100), path=file)
    two.charge("bob", 1, 0)
    two.close()  # the file changed under one: its next tick adopts it
    stat = usage_file.file_stamp
    charged = []

    def stamp_then_charge(path):
        if not charged:  # a generation ends on another thread while the saver looks at the file
            charged.append(1)
            one.charge("alice", 2, 3)
        return stat(path)

    monkeypatch.setattr(usage_file, "file_stamp", stamp_then_charge)
    one._saver.flush()
    monkeypatch.setattr(usage_file, "file_stamp", stat)
    one.close()
    saved = read_usage(file)
    assert saved["alice"]["tokens_today"] == 5 and saved["bob"]["tokens_today"] == 1
