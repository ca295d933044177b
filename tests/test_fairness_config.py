"""The fairness reserve and activity window as configuration: validated, and wired into each runner."""

from __future__ import annotations

import asyncio

import pytest

from tests.server_fixtures import TINY
from tests.test_fairness import _engine as _fake_engine_default
from tests.test_fairness import _req, _run
from xllm_jupyter.core.config import EngineConfig, QuotaConfig, load_config
from xllm_jupyter.core.errors import ConfigError
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.engine.fairness import FairnessPolicy

from .fake_backend import FakeBackend, FakeCatalog


# ------------------------------------------------------------------- config
def test_defaults_and_yaml_and_env_reach_the_quota_config(tmp_path):
    assert load_config(tmp_path / "none.yaml", env={}).quotas.reserved_slots == 1
    assert load_config(tmp_path / "none.yaml", env={}).quotas.active_window_seconds == 60.0
    path = tmp_path / "config.yaml"
    path.write_text("quotas:\n  reserved_slots: 3\n  active_window_seconds: 2.5\n")
    q = load_config(path, env={}).quotas
    assert (q.reserved_slots, q.active_window_seconds) == (3, 2.5)
    q = load_config(path, env={"XLLM_QUOTAS_RESERVED_SLOTS": "0"}).quotas
    assert (q.reserved_slots, q.active_window_seconds) == (0, 2.5)
    assert FairnessPolicy.from_quotas(q) == FairnessPolicy(reserved=0, window=2.5)


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("reserved_slots", "-1", "between 0 and 1024"),
    ("reserved_slots", "1.5", "expected int"),
    ("active_window_seconds", "0", "at least 0.001"),
    ("active_window_seconds", "-5", "at least 0.001"),
])
def test_invalid_values_are_config_errors_naming_the_key(tmp_path, key, value, needle):
    with pytest.raises(ConfigError, match=f"quotas.{key}") as err:
        load_config(tmp_path / "none.yaml", env={f"XLLM_QUOTAS_{key.upper()}": value})
    assert needle in err.value.message


def test_a_queue_with_no_reserve_lets_one_user_take_every_slot():
    clock = [0.0]
    for policy, admitted in ((FairnessPolicy(reserved=0), 4), (FairnessPolicy(), 3)):
        q = policy.queue()
        q._clock = lambda: clock[0]  # noqa: SLF001 - a deterministic clock for this check
        q.append((_job("b"), None))
        assert len(q.take(1)) == 1  # b is active now
        q.extend([(_job("a"), None) for _ in range(8)])
        assert len(q.take(4, running=[], max_batch=4)) == admitted  # 4 free slots, b still recent


def test_the_window_decides_how_long_another_user_counts_as_active():
    clock = [0.0]
    q = FairnessPolicy(reserved=1, window=5.0).queue()
    q._clock = lambda: clock[0]  # noqa: SLF001
    q.append((_job("b"), None))
    q.take(1)
    clock[0] = 6.0  # b queued 6 s ago: outside a 5 s window, so a alone gets every slot
    q.extend([(_job("a"), None) for _ in range(8)])
    assert len(q.take(4, running=[], max_batch=4)) == 4
    with pytest.raises(ValueError, match="positive"):
        FairnessPolicy(window=0).queue()


def _job(user: str):
    from types import SimpleNamespace

    return SimpleNamespace(user=user)


# ------------------------------------------------------- the engine, end to end
async def _flood_running(engine: Engine, backend: FakeBackend) -> int:
    """The most of alice's 8 long jobs that ran at once while bob was a recent user."""
    await engine.start()
    try:
        await engine.load("fake")
        await _run(engine, _req("bob", 2), [], "bob")  # bob is now a recent user
        done: list[str] = []
        flood = asyncio.gather(*(_run(engine, _req("alice", 60), done, "alice") for _ in range(8)))
        most = 0
        while not flood.done():  # sampled every ~2 ms over ~240 steps of 2 ms
            most = max(most, len(backend.models["fake"].jobs))
            await asyncio.sleep(0.002)
        await flood
        assert done == ["alice"] * 8
        return most
    finally:
        await engine.stop()


async def test_engine_with_no_reserve_lets_one_user_fill_the_batch_while_another_is_active():
    backend = FakeBackend(step_delay=0.002)
    engine = Engine(EngineConfig(max_batch_size=4), FakeCatalog(["fake"]), [backend], quotas=QuotaConfig(reserved_slots=0))
    assert await _flood_running(engine, backend) == 4


async def test_engine_with_the_default_reserve_keeps_a_slot_free():
    engine, backend = _fake_engine_default(max_batch_size=4)
    assert await _flood_running(engine, backend) == 3


async def test_configured_numbers_reach_the_runner_of_a_real_model(tiny_catalog):
    quotas = QuotaConfig(reserved_slots=2, active_window_seconds=7.5)
    engine = Engine(EngineConfig(max_batch_size=4, torch_threads=1), catalog=tiny_catalog, quotas=quotas)
    await engine.start()
    try:
        await engine.load(TINY)
        queue = engine._runners[TINY]._waiting  # noqa: SLF001 - the wiring is what is under test
        assert (queue.reserved, queue.window) == (2, 7.5)
    finally:
        await engine.stop()


# ------------------------------------------------------- the reserve while one user is alone
def test_reserve_when_alone_is_read_from_yaml_and_env(tmp_path):
    assert load_config(tmp_path / "none.yaml", env={}).quotas.reserve_when_alone is False
    q = load_config(tmp_path / "none.yaml", env={"XLLM_QUOTAS_RESERVE_WHEN_ALONE": "true"}).quotas
    assert q.reserve_when_alone is True
    assert FairnessPolicy.from_quotas(q) == FairnessPolicy(always=True)


def test_the_hub_service_keeps_the_reserve_when_alone_unless_the_admin_says_otherwise(tmp_path, monkeypatch):
    from xllm_jupyter.hub import service
    from xllm_jupyter.hub.__main__ import main as hub_main

    none = tmp_path / "none.yaml"
    assert service.load_hub_config(none, env={}).quotas.reserve_when_alone is True  # a hub is shared
    assert load_config(none, env={}).quotas.reserve_when_alone is False  # xllm serve, Jupyter: as before
    path = tmp_path / "config.yaml"
    path.write_text("quotas:\n  reserve_when_alone: false\n")
    assert service.load_hub_config(path, env={}).quotas.reserve_when_alone is False  # the admin's word wins
    assert service.load_hub_config(none, env={"XLLM_QUOTAS_RESERVE_WHEN_ALONE": "0"}).quotas.reserve_when_alone is False
    seen = []

    async def run(config, env=None):  # the service as `xllm hub-service` starts it, stopped before it listens
        seen.append(config.quotas.reserve_when_alone)

    monkeypatch.setattr(service, "run_hub_service", run)
    monkeypatch.setattr("xllm_jupyter.server.logging_setup.setup_logging", lambda http: None)
    monkeypatch.setenv("XLLM_CONFIG", str(none))
    monkeypatch.delenv("XLLM_QUOTAS_RESERVE_WHEN_ALONE", raising=False)
    assert hub_main([]) == 0 and seen == [True]


async def _newcomer_first(quotas: QuotaConfig) -> bool:
    """Alice alone floods 8 long jobs; bob, never seen before, sends one short job: does he finish first?"""
    backend = FakeBackend(step_delay=0.002)
    engine = Engine(EngineConfig(max_batch_size=4), FakeCatalog(["fake"]), [backend], quotas=quotas)
    await engine.start()
    try:
        await engine.load("fake")
        done: list[str] = []
        flood = asyncio.gather(*(_run(engine, _req("alice", 150), done, "alice") for _ in range(8)))
        model = backend.models["fake"]
        while len(model.jobs) < (3 if quotas.reserve_when_alone else 4):  # alice's first jobs decode
            await asyncio.sleep(0.002)
        await _run(engine, _req("bob", 3), done, "bob")
        await flood
        return done[0] == "bob"
    finally:
        await engine.stop()


async def test_reserve_when_alone_lets_a_newcomer_start_before_a_lone_users_generations_end():
    # by default a lone user fills the batch, so a newcomer waits for one of her generations to end
    assert await _newcomer_first(QuotaConfig()) is False
    assert await _newcomer_first(QuotaConfig(reserve_when_alone=True)) is True
