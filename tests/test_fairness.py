"""Per-user fairness in the engine (FairQueue + runner), quotas and isolation helpers (no hub needed)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from xllm_jupyter.core.config import EngineConfig, QuotaConfig, load_config
from xllm_jupyter.core.errors import ConfigError, NotFound, RateLimited
from xllm_jupyter.core.types import ChoiceDelta, GenerationParams, GenerationRequest
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.engine.fairness import FairnessPolicy, FairQueue
from xllm_jupyter.openai.cache import ResponseCache
from xllm_jupyter.openai.response_store import ResponseStore, StoredResponse
from xllm_jupyter.server.usage import Caller, UsageTracker

from .fake_backend import FakeBackend, FakeCatalog


def _q(**kw) -> FairQueue:
    return FairQueue(key=lambda item: item[0], **kw)


# ------------------------------------------------------------------ FairQueue
def test_one_user_is_plain_fifo_and_gets_the_whole_batch():
    q = _q()
    q.extend([("a", i) for i in range(10)])
    assert [i for _, i in q.take(8, max_batch=8)] == list(range(8))  # alone: no slot held back
    assert len(q) == 2 and [i for _, i in q] == [8, 9]


def test_round_robin_across_users_least_running_first():
    q = _q()
    q.extend([("a", i) for i in range(6)])
    q.extend([("b", 0), ("b", 1)])
    q.append(("c", 0))
    # a already runs 3 jobs: b and c go first, then the rotation continues fairly
    got = q.take(5, running=["a", "a", "a"])
    assert [u for u, _ in got] == ["b", "c", "b", "a", "a"]
    assert [i for u, i in got if u == "a"] == [0, 1]  # each user's own order is kept


def test_reserve_keeps_a_slot_for_others_once_several_users_are_active():
    clock = [0.0]
    q = _q(reserved=1, window=60, clock=lambda: clock[0])
    q.append(("b", 0))
    assert [u for u, _ in q.take(1)] == ["b"]  # b was active a moment ago
    q.extend([("a", i) for i in range(10)])
    assert len(q.take(8, running=[], max_batch=4)) == 3  # a holds at most 4 - 1 while b is recent
    assert q.take(1, running=["a"] * 3, max_batch=4) == []  # the reserve stays free...
    q.append(("b", 1))
    assert q.take(1, running=["a"] * 3, max_batch=4) == [("b", 1)]  # ...for b, at once
    clock[0] = 120.0  # b went quiet: a alone may use every slot again
    assert len(q.take(1, running=["a"] * 3, max_batch=4)) == 1


def test_a_flood_still_waiting_past_the_window_keeps_the_reserve_for_an_active_user():
    # a queued her flood once, more than a window ago, and it still waits; b keeps coming back (within the
    # window). a's waiting work makes her active: the reserve stays, so b's next request starts within a step
    clock = [0.0]
    q = _q(reserved=1, window=60, clock=lambda: clock[0])
    q.append(("b", 0))
    q.extend([("a", i) for i in range(10)])
    assert [u for u, _ in q.take(4, max_batch=4)] == ["b", "a", "a"]  # one slot kept free
    clock[0] = 50.0
    q.append(("b", 1))  # b, back within the window after his first ended: the free slot, at once
    assert q.take(2, running=["a", "a"], max_batch=4) == [("b", 1)]
    clock[0] = 100.0  # b's second ended, and one of a's; a queued nothing for 100 s, but 7 of hers still wait
    assert [u for u, _ in q.take(2, running=["a", "a"], max_batch=4)] == ["a"]  # not both: the reserve holds
    q.append(("b", 2))
    assert q.take(1, running=["a", "a", "a"], max_batch=4) == [("b", 2)]  # b starts at once, not after a's end


def test_a_user_whose_generation_just_ended_counts_as_active():
    # b's one generation ran for longer than the window while a's flood waited: when it ends, b is active from
    # then, so the slot it frees stays free for b's next request rather than going to a
    clock = [0.0]
    q = _q(reserved=1, window=60, clock=lambda: clock[0])
    q.append(("b", 0))
    q.extend([("a", i) for i in range(10)])
    assert [u for u, _ in q.take(4, max_batch=4)] == ["b", "a", "a"]
    clock[0] = 150.0
    q.ended("b")  # b's generation ends (the runner says so as its job leaves the batch)
    assert [u for u, _ in q.take(2, running=["a", "a"], max_batch=4)] == ["a"]  # one slot still waits for b
    clock[0] = 151.0
    q.append(("b", 1))
    assert q.take(1, running=["a", "a", "a"], max_batch=4) == [("b", 1)]
    clock[0] = 300.0  # b gone quiet for a window: a alone may take every slot
    assert len(q.take(1, running=["a", "a", "a"], max_batch=4)) == 1


def test_two_users_floods_together_leave_the_reserve_to_a_third():
    # the reserve is the batch's, not each user's: a and b flooding hold max_batch - 1 slots between them
    q = _q(reserved=1, window=60)
    q.extend([("a", i) for i in range(5)])
    q.extend([("b", i) for i in range(5)])
    assert sorted(u for u, _ in q.take(4, max_batch=4)) == ["a", "a", "b"]
    assert q.take(1, running=["a", "a", "b"], max_batch=4) == []  # neither takes the last slot...
    q.append(("c", 0))
    assert q.take(1, running=["a", "a", "b"], max_batch=4) == [("c", 0)]  # ...c, who runs nothing, does
    q.append(("c", 1))  # one of a's ended; c asks again while running one: c waits like the others
    assert q.take(1, running=["a", "b", "c"], max_batch=4) == []


def test_a_returning_user_served_longest_ago_wins_a_tie():
    q = _q()
    q.append(("b", 0))
    q.take(1)  # b was served first...
    q.extend([("a", i) for i in range(4)])
    q.take(2)  # ...then a, twice
    q.append(("b", 1))  # b comes back: no one runs anything, so the tie goes to b
    assert [u for u, _ in q.take(2)] == ["b", "a"]


def test_a_job_that_does_not_fit_waits_first_in_line():
    q = _q()
    q.extend([("a", 5), ("a", 1), ("b", 9), ("b", 1)])
    room = [10]

    def fits(item):
        if item[1] > room[0]:
            return False
        room[0] -= item[1]
        return True

    # a (first in line) takes 5; b's 9 does not fit the 5 left, and nobody overtakes it
    assert q.take(4, fits=fits) == [("a", 5)]
    room[0] = 9
    assert q.take(4, fits=fits) == [("b", 9)]  # room frees: b's job goes first


def test_remove_if_drops_cancelled_items_and_counts_them():
    q = _q()
    q.extend([("a", 1), ("b", 2), ("a", 3)])
    assert q.remove_if(lambda item: item[1] in (1, 2)) == 2
    assert list(q) == [("a", 3)] and q.waiting_users() == ["a"]
    q.clear()
    assert not q and len(q) == 0


# ------------------------------------------------------ the runner, end to end
def _engine(max_batch_size: int = 4, step_delay: float = 0.002, **model_kwargs):
    backend = FakeBackend(step_delay=step_delay, **model_kwargs)
    return Engine(EngineConfig(max_batch_size=max_batch_size), FakeCatalog(["fake"]), [backend]), backend


def _req(user: str | None, max_tokens: int, namespace: str = "") -> GenerationRequest:
    params = GenerationParams(max_tokens=max_tokens, ignore_eos=True)
    return GenerationRequest(model="fake", prompt_ids=(1, 2, 3), params=params, user=user, cache_namespace=namespace)


async def _run(engine: Engine, request: GenerationRequest, done: list, tag: str) -> None:
    async for ev in engine.generate(request):
        if isinstance(ev, ChoiceDelta) and ev.finish is not None:
            done.append(tag)


async def _flood(engine: Engine, backend: FakeBackend, tagged: list[tuple[GenerationRequest, str]], finished: list,
                 decoding: int) -> list[asyncio.Future]:
    """Start every (request, tag) at once; their tasks, once ``decoding`` of their jobs are in the model's batch."""
    flood = [asyncio.ensure_future(_run(engine, request, finished, tag)) for request, tag in tagged]
    model = backend.models["fake"]
    deadline = asyncio.get_running_loop().time() + 10
    while len(model.jobs) < decoding:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.002)
    return flood


async def test_a_flooding_user_cannot_starve_another():
    engine, backend = _engine(max_batch_size=4)
    await engine.start()
    try:
        await engine.load("fake")
        finished: list[str] = []
        await _run(engine, _req("bob", 2), finished, "bob-warm")  # bob is a recent user
        # alice's first jobs are decoding
        flood = await _flood(engine, backend, [(_req("alice", 200), f"alice{i}") for i in range(8)], finished, 3)
        assert len(backend.models["fake"].jobs) == 3  # the 4th slot is held for someone else
        await _run(engine, _req("bob", 5), finished, "bob")
        assert finished[:2] == ["bob-warm", "bob"]  # bob finished before any of alice's 8 jobs
        await asyncio.gather(*flood)
        assert sorted(finished[2:]) == sorted(f"alice{i}" for i in range(8))
    finally:
        await engine.stop()


async def test_the_slot_a_long_generation_frees_waits_for_its_users_next_request(monkeypatch):
    # bob's generation outlasts the activity window while alice's flood waits for slots; when it ends, the slot
    # stays free and bob's next request starts at once instead of after one of alice's (endless) generations.
    # The queues' clock is the test's: it jumps past the window while bob generates, so no timing decides it.
    now = [0.0]
    monkeypatch.setattr(FairnessPolicy, "queue", lambda self: FairQueue(
        reserved=self.reserved, window=self.window, always=self.always, clock=lambda: now[0]))
    backend = FakeBackend(step_delay=0.002, context_length=10**6)
    engine = Engine(EngineConfig(max_batch_size=4), FakeCatalog(["fake"]), [backend],
                    quotas=QuotaConfig(active_window_seconds=1.0))
    await engine.start()
    flood: list[asyncio.Future] = []
    try:
        await engine.load("fake")
        finished: list[str] = []
        bob = asyncio.ensure_future(_run(engine, _req("bob", 300), finished, "bob-long"))
        model = backend.models["fake"]
        while not model.jobs:
            await asyncio.sleep(0.002)
        flood += [asyncio.ensure_future(_run(engine, _req("alice", 10**5), finished, "alice")) for _ in range(6)]
        while len(model.jobs) < 2:  # alice's first jobs are decoding beside bob's
            await asyncio.sleep(0.002)
        now[0] = 100.0  # bob's generation has outlasted the window (his request was seen at 0)
        await bob
        await asyncio.wait_for(_run(engine, _req("bob", 2), finished, "bob"), 10)
        assert finished == ["bob-long", "bob"]
    finally:
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
        await engine.stop()


async def test_two_flooding_users_cannot_starve_a_third():
    engine, backend = _engine(max_batch_size=4)
    await engine.start()
    try:
        await engine.load("fake")
        finished: list[str] = []
        # their first jobs are decoding
        flood = await _flood(engine, backend, [(_req(user, 200), user) for _ in range(4) for user in ("alice", "bob")],
                             finished, 3)
        assert len(backend.models["fake"].jobs) == 3  # alice's and bob's hold 3 of the 4 slots between them
        await _run(engine, _req("carol", 5), finished, "carol")
        assert finished == ["carol"]  # carol started at once, not after one of their 200-token generations
        await asyncio.gather(*flood)
    finally:
        await engine.stop()


async def test_room_in_the_model_goes_to_the_next_user_in_line():
    """A model with room for two of these jobs (an exllama KV cache): the engine adds no job that does
    not fit, so none waits in the backend's own first-come queue, and the newcomer gets the next room."""
    engine, backend = _engine(max_batch_size=8, capacity=2 * 203)
    await engine.start()
    try:
        await engine.load("fake")
        finished: list[str] = []
        await _run(engine, _req("bob", 2), finished, "bob-warm")
        flood = await _flood(engine, backend, [(_req("alice", 200), f"alice{i}") for i in range(6)], finished, 2)
        model = backend.models["fake"]
        assert model.active_jobs() == 2 and engine.stats("fake").queued == 4  # the rest wait in the engine
        await _run(engine, _req("bob", 200), finished, "bob")  # as big as alice's: no room until one ends
        await asyncio.gather(*flood)
        assert model.started == ["bob", "alice", "alice", "bob", "alice", "alice", "alice", "alice"]
        assert finished.index("bob") <= 3 and not model.overcommitted  # after alice's first two at most
    finally:
        await engine.stop()


async def test_a_job_bigger_than_the_counted_room_still_runs_on_an_idle_model():
    """The room count may misjudge; an idle model takes the next job anyway, so nothing stalls."""
    engine, backend = _engine(max_batch_size=4, capacity=50)
    await engine.start()
    try:
        await engine.load("fake")
        finished: list[str] = []
        await asyncio.wait_for(asyncio.gather(*(_run(engine, _req(u, 100), finished, u) for u in ("a", "b"))), 10)
        assert sorted(finished) == ["a", "b"]
        assert backend.models["fake"].batch_sizes and max(backend.models["fake"].batch_sizes) == 1  # one at a time
    finally:
        await engine.stop()


async def test_user_and_cache_namespace_reach_the_backend_job():
    engine, backend = _engine()
    await engine.start()
    try:
        await engine.load("fake")
        await _run(engine, _req("alice", 2, namespace="alice"), [], "x")
        await _run(engine, _req(None, 2), [], "y")
        jobs = list(_seen_jobs(backend))
        assert [(j.user, j.cache_namespace) for j in jobs] == [("alice", "alice"), (None, "")]
    finally:
        await engine.stop()


def _seen_jobs(backend: FakeBackend):
    """Every job the fake model was given, in order (FakeModel.add records them)."""
    model = backend.models["fake"]
    return getattr(model, "seen", [])


@pytest.fixture(autouse=True)
def _record_jobs(monkeypatch):
    """Make FakeModel remember every job it was handed (the fake itself forgets them)."""
    from . import fake_backend

    original = fake_backend.FakeModel.add

    def add(self, job):
        self.__dict__.setdefault("seen", []).append(job)
        return original(self, job)

    monkeypatch.setattr(fake_backend.FakeModel, "add", add)


# ------------------------------------------------------------ quotas & usage
def test_quota_limits_resolve_user_over_group_over_default():
    cfg = QuotaConfig(max_concurrent=2, tokens_per_day=100, user_max_concurrent=("alice=5",),
                      group_tokens_per_day=("staff=1000", "big=0", "small=10"))
    t = UsageTracker(cfg)
    assert t.limits(Caller("alice")) == (5, 100)
    assert t.limits(Caller("bob", ("small",))) == (2, 10)
    assert t.limits(Caller("bob", ("small", "staff"))) == (2, 1000)  # the most generous group
    assert t.limits(Caller("bob", ("big", "staff"))) == (2, 0)  # 0 = unlimited wins
    with pytest.raises(ConfigError, match="quotas.user_max_concurrent"):
        UsageTracker(QuotaConfig(user_max_concurrent=("alice",)))


def test_concurrency_and_daily_token_quotas_refuse_with_429():
    now = [1_000_000.0]
    t = UsageTracker(QuotaConfig(max_concurrent=1, tokens_per_day=10), clock=lambda: now[0])
    ticket = t.admit(Caller("alice"))
    with pytest.raises(RateLimited, match="concurrent"):
        t.admit(Caller("alice"))
    t.admit(Caller("bob"))  # another user's slot is their own
    t.release(ticket)
    t.charge("alice", 6, 3)
    t.release(t.admit(Caller("alice")))  # 9 of 10 used: still admitted (usage is known only afterwards)
    t.charge("alice", 1, 2)
    with pytest.raises(RateLimited, match="Daily token quota") as err:
        t.admit(Caller("alice"))
    assert 0 < err.value.retry_after <= 86400
    now[0] += 86400  # ...until the next UTC day
    t.release(t.admit(Caller("alice")))
    row = t.snapshot("alice")[0]
    assert row["total_tokens"] == 12 and row["tokens_today"] == 0 and row["rejected"] == {"concurrency": 1, "tokens_per_day": 1}


def test_metrics_user_labels_are_bounded():
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    t = UsageTracker(QuotaConfig(metrics_max_users=2), reg)
    for user in ("u1", "u2", "u3", "u4"):
        t.release(t.admit(Caller(user)))
    text = generate_latest(reg).decode()
    labels = {line.split('user="')[1].split('"')[0] for line in text.splitlines() if line.startswith("xllm_user_requests_total")}
    assert labels == {"u1", "u2", "other"}


def test_user_labels_never_collide_with_the_reserved_ones():
    """Users named ``other`` or ``anonymous`` had the labels of the users past the cap and of callers with no user,
    adding their counts to those buckets: a reserved name (or one starting with ``~``) gets a ``~`` in front."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    t = UsageTracker(QuotaConfig(metrics_max_users=5), reg)
    for user in ("other", "anonymous", "~other", None, "alice", "bob", "carol"):
        t.release(t.admit(Caller(user)))
    counts = {s.labels["user"]: s.value for m in reg.collect() for s in m.samples if s.name == "xllm_user_requests_total"}
    assert counts == {"~other": 1, "~anonymous": 1, "~~other": 1, "anonymous": 1, "alice": 1, "other": 2}


def test_quotas_section_loads_from_yaml_mappings(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("quotas:\n  user_tokens_per_day: {alice: 50}\n  share_prefix_cache: true\nhub:\n  admin_groups: [ops]\n")
    cfg = load_config(path, env={})
    assert cfg.quotas.user_tokens_per_day == ("alice=50",) and cfg.quotas.share_prefix_cache
    assert cfg.hub.admin_groups == ("ops",)
    assert dataclasses.replace(cfg.quotas, share_prefix_cache=False).metrics_max_users == 100


# ----------------------------------------------------------------- isolation
def test_stored_responses_are_owned_per_user():
    store = ResponseStore()
    store.put("resp_1", StoredResponse({"id": "resp_1"}, owner="alice"))
    assert store.get("resp_1", owner="alice").response["id"] == "resp_1"
    for call in (lambda: store.get("resp_1", owner="bob"), lambda: store.delete("resp_1", owner="bob"), lambda: store.get("resp_1")):
        with pytest.raises(NotFound):
            call()
    store.delete("resp_1", owner="alice")
    with pytest.raises(NotFound):
        store.get("resp_1", owner="alice")


def test_many_tiny_stored_objects_push_out_their_owners_own_not_anothers_large_one():
    store = ResponseStore(capacity=100)
    store.put("resp_big", StoredResponse({"id": "resp_big", "text": "x" * 100_000}, owner="alice"))
    for i in range(500):  # each far smaller than alice's, together still fewer bytes
        store.put(f"resp_{i}", StoredResponse({"id": i}, owner="mallory"))
    assert store.get("resp_big", owner="alice").response["id"] == "resp_big"  # evicted first on the old code
    assert len(store) == 100 and store.peek("resp_499", owner="mallory") is not None


def test_response_cache_keys_are_per_user():
    cache = ResponseCache()
    body = {"model": "m", "messages": [], "temperature": 0}
    assert cache.key("chat", body, "id", "alice") != cache.key("chat", body, "id", "bob")
    assert cache.key("chat", body, "id", "alice") == cache.key("chat", {**body, "user": "x"}, "id", "alice")


# ------------------------------------------------ standalone: API keys are users
def test_standalone_api_keys_are_users_for_isolation_quotas_and_usage(xllm_home, tiny_catalog):
    import httpx

    from tests.server_fixtures import TINY, make_test_config, running_server
    from xllm_jupyter.server.auth import key_id

    k1, k2 = "sk-user-a", "sk-user-b"
    cfg = make_test_config(xllm_home, api_keys=(k1, k2))
    cfg = dataclasses.replace(cfg, quotas=QuotaConfig(tokens_per_day=10**6))
    with running_server(cfg, tiny_catalog, TINY) as srv:
        a = httpx.Client(base_url=srv.root, headers={"Authorization": f"Bearer {k1}"}, timeout=60)
        b = httpx.Client(base_url=srv.root, headers={"Authorization": f"Bearer {k2}"}, timeout=60)
        with a, b:
            r = a.post("/v1/responses", json={"model": TINY, "input": "hi", "max_output_tokens": 2})
            rid = r.json()["id"]
            assert b.get(f"/v1/responses/{rid}").status_code == 404
            assert b.delete(f"/v1/responses/{rid}").status_code == 404
            assert a.get(f"/v1/responses/{rid}").status_code == 200
            usage = {row["user"]: row for row in a.get("/admin/usage").json()["data"]}
    assert usage[key_id(k1)]["total_tokens"] > 0 and key_id(k2) not in usage
    assert usage[key_id(k1)]["limits"] == {"max_concurrent": 0, "tokens_per_day": 10**6}


def test_a_keyless_servers_caller_is_labelled_anonymous_not_a_user_named_so(xllm_home, tiny_catalog):
    """``xllm serve`` without keys serves one anonymous caller, labelled ``user="anonymous"`` as documented; since
    user labels escape reserved names its key id ``anonymous`` came out as ``~anonymous``, a user's."""
    import httpx

    from tests.server_fixtures import TINY, make_test_config, running_server

    with running_server(make_test_config(xllm_home, api_keys=()), tiny_catalog, TINY) as srv:
        with httpx.Client(base_url=srv.root, timeout=60) as client:
            r = client.post("/v1/chat/completions", json={"model": TINY, "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            text = client.get("/metrics").text
    labels = {line.split('user="')[1].split('"')[0] for line in text.splitlines() if line.startswith("xllm_user_")}
    assert labels == {"anonymous"}


def test_jupyter_callers_are_the_servers_owner_not_a_random_anonymous_user(monkeypatch):
    from types import SimpleNamespace

    from jupyter_server.auth.identity import IdentityProvider, User

    from xllm_jupyter.server.usage import caller_of

    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    anonymous = User("3f2a" * 8, "Anonymous Io")  # what Jupyter makes up per token request
    handler = SimpleNamespace(identity_provider=IdentityProvider(), current_user=anonymous)
    assert caller_of(handler).user == "alice"

    class HubProvider:  # a provider with real users (JupyterHub's single-user one) is trusted
        pass

    handler = SimpleNamespace(identity_provider=HubProvider(), current_user=User("bob"))
    assert caller_of(handler).user == "bob"
    assert caller_of(SimpleNamespace(xllm_key_id="key-abc")).user == "key-abc"


def test_the_response_store_evicts_from_whoever_holds_the_most():
    # one user storing many (or large) responses pushes out their own, not everyone else's
    store = ResponseStore(capacity=6, max_bytes=10_000)
    store.put("resp_a", StoredResponse({"id": "resp_a"}, owner="alice"))
    for i in range(10):
        store.put(f"resp_m{i}", StoredResponse({"id": f"resp_m{i}"}, owner="mallory"))
    assert store.get("resp_a", owner="alice").response["id"] == "resp_a" and len(store) == 6
    assert [store.get(f"resp_m{i}", owner="mallory").response["id"] for i in range(5, 10)] == [
        f"resp_m{i}" for i in range(5, 10)]
    store.put("resp_big", StoredResponse({"id": "resp_big", "blob": "x" * 9_000}, owner="mallory"))
    assert store.nbytes <= 10_000 and store.get("resp_a", owner="alice")  # bytes are bounded the same way
    with pytest.raises(NotFound):
        store.get("resp_m5", owner="mallory")  # her least recently used went
    store.delete("resp_big", owner="mallory")
    for rid in [r for r in list(store._items) if r.startswith("resp_m")]:
        store.delete(rid, owner="mallory")
    store.delete("resp_a", owner="alice")
    assert len(store) == 0 and store.nbytes == 0
