"""``top_k: -1``, vLLM's default and its spelling of "no top-k" (LangChain's vLLM wrappers and scripts ported from
vLLM send it), is taken as 0 is on every route, in a Modelfile and in a model's generation_config; any other
negative stays a 400 naming ``top_k``. Real server, real SDK, raw httpx; the backends' mappings on CPU."""

from __future__ import annotations

import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.backends.exllama_common import v2_sampler_fields
from xllm_jupyter.backends.exllama_sampling import v3_sampler_steps
from xllm_jupyter.backends.sampling import Filters
from xllm_jupyter.core.types import SamplingParams
from xllm_jupyter.store.generation_defaults import sampling_defaults
from xllm_jupyter.store.modelfile import ModelfileError, parse_modelfile

MSG = [{"role": "user", "content": "Hi"}]
#: seeded sampling at full temperature: top-k, were -1 taken as anything but "off", would change the tokens
SEEDED = {"max_tokens": 8, "temperature": 1.0, "seed": 11}


def _chat(client, top_k):
    r = client.chat.completions.create(model=TINY, messages=MSG, **SEEDED, extra_body={"top_k": top_k})
    return r.choices[0].message.content


def _completion(client, top_k):
    return client.completions.create(model=TINY, prompt="Hi", **SEEDED, extra_body={"top_k": top_k}).choices[0].text


def _response(client, top_k):
    r = client.responses.create(model=TINY, input="Hi", max_output_tokens=16, temperature=1.0,
                                extra_body={"top_k": top_k, "seed": 11})
    return r.output_text


@pytest.mark.parametrize("route", [_chat, _completion, _response], ids=["chat", "completions", "responses"])
def test_top_k_minus_one_samples_as_no_top_k(client, route):
    off = route(client, 0)
    assert route(client, -1) == off == route(client, None)
    assert route(client, 2) != off or route(client, 1) != off  # (top-k does act on these tokens: the check can fail)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
@pytest.mark.parametrize("top_k", [-2, -100])
def test_other_negative_top_k_is_a_400_naming_top_k(raw, path, top_k):
    body = {"model": TINY, "top_k": top_k}
    body.update({"/v1/chat/completions": {"messages": MSG, "max_tokens": 2}, "/v1/completions": {"prompt": "Hi", "max_tokens": 2},
                 "/v1/responses": {"input": "Hi", "max_output_tokens": 16}}[path])
    r = raw.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "top_k" and r.json()["error"]["type"] == "invalid_request_error"


def test_top_k_minus_one_streams(client):
    chunks = list(client.chat.completions.create(model=TINY, messages=MSG, stream=True, **SEEDED, extra_body={"top_k": -1}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == _chat(client, 0)


def test_a_modelfile_and_generation_config_take_top_k_minus_one(tmp_path):
    assert parse_modelfile(f"FROM {TINY}\nPARAMETER top_k -1\n").parameters["top_k"] == -1
    with pytest.raises(ModelfileError, match="top_k"):
        parse_modelfile(f"FROM {TINY}\nPARAMETER top_k -2\n")
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "top_k": -1}')
    assert sampling_defaults(tmp_path)["top_k"] == -1


def test_every_backend_maps_top_k_minus_one_as_off():
    off, minus = SamplingParams(temperature=0.7, top_k=0), SamplingParams(temperature=0.7, top_k=-1)
    assert v3_sampler_steps(minus) == v3_sampler_steps(off)  # exllamav3: SS_TopK(0)
    assert v2_sampler_fields(minus) == v2_sampler_fields(off)  # exllamav2: its job cuts with Filters
    assert Filters.of([minus], 100).top_k == Filters.of([off], 100).top_k == [0]  # transformers, exllamav2's job
    assert not Filters.of([minus], 100).truncates(0)
