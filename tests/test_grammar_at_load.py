"""The grammar engine's tokenizer is built while a model loads, not by its first structured request.

llguidance builds it in 0.3-0.7 s for a 49k vocabulary holding the GIL throughout, so built by the
first ``response_format``/forced-tools request (on a worker thread even) it froze the IOLoop: every
user's stream and ``/health`` (benchmarks/first_use_stall.py). Counted, not timed: which phase calls
``llguidance.hf.from_tokenizer``.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
llguidance_hf = pytest.importorskip("llguidance.hf")

from tests.server_fixtures import TINY, make_test_config  # noqa: E402
from xllm_jupyter.backends.constraints import GrammarCompiler  # noqa: E402
from xllm_jupyter.core.errors import InvalidRequest  # noqa: E402
from xllm_jupyter.core.types import Constraint  # noqa: E402
from xllm_jupyter.engine.engine import Engine  # noqa: E402

SCHEMA = Constraint(kind="json_schema", spec=json.dumps({"type": "object", "properties": {"city": {"type": "string"}}}))


class Builds(list):
    """The phase (``load``, ``request``) of each call of llguidance's tokenizer build."""

    phase = "load"


@pytest.fixture
def builds(monkeypatch) -> Builds:
    """Counts llguidance's tokenizer builds, each noted with the phase the test is in."""
    calls = Builds()
    real = llguidance_hf.from_tokenizer

    def counted(*args, **kwargs):
        calls.append(calls.phase)
        return real(*args, **kwargs)

    monkeypatch.setattr(llguidance_hf, "from_tokenizer", counted)
    return calls


async def test_the_first_structured_request_finds_the_tokenizer_built_at_load(xllm_home, tiny_catalog, builds):
    engine = Engine(make_test_config(xllm_home).engine, catalog=tiny_catalog)
    await engine.start()
    try:
        model = await engine.load(TINY)
        assert builds == ["load"]  # built once, by the load
        builds.phase = "request"
        await engine.check_constraint(TINY, SCHEMA)  # what serving does before queueing a structured request
        await engine.check_constraint(TINY, Constraint(kind="json_object", spec=""))
        assert builds == ["load"]  # no request built it again
        assert model.vocab_size >= 49_152  # the real SmolLM2 vocabulary: the build the stall came from
    finally:
        await engine.stop()


def test_a_tokenizer_llguidance_cannot_take_loads_and_refuses_each_constraint_with_a_400(builds):
    grammars = GrammarCompiler(object(), 32, [0])  # not a fast (Rust) tokenizer: llguidance refuses it
    grammars.prepare()  # the load goes on
    assert grammars.prepared and builds == ["load"]
    for _ in range(2):  # refused from the reason kept at load, without another build
        with pytest.raises(InvalidRequest) as err:
            grammars.compile(SCHEMA)
        assert err.value.code == "unsupported_parameter" and "not available for this model" in str(err.value)
    assert builds == ["load"]
