"""LoRA adapters: stored like models, attached to one loaded base, mixed per row in one batch.

Real parts only: adapters built with peft for the tiny random Llama, a real store, a
real standalone server and the openai SDK.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.store.manifest import Manifest, read_manifest
from xllm_jupyter.store.store import ModelStore

PROMPT = "The quick brown fox"


def _make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A random (non-zero) LoRA for the tiny Llama: it changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def lora_dirs(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Two different LoRA adapter directories for the tiny Llama."""
    root = tmp_path_factory.mktemp("loras")
    one = _make_adapter(tiny_llama_dir, root / "one", seed=1)
    two = _make_adapter(tiny_llama_dir, root / "two", seed=2)
    # the second names its base by store name, so its pull needs no explicit base
    cfg_path = two / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = TINY
    cfg_path.write_text(json.dumps(cfg))
    return one, two


@pytest.fixture(scope="module")
def lora_home(tmp_path_factory, tiny_llama_dir, lora_dirs) -> Path:
    """A store with "tiny" and two adapters on it: "ad-one" (base given) and "ad-two" (base from its config)."""
    home = tmp_path_factory.mktemp("lora-home")
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    store.pull(str(lora_dirs[0]), "ad-one", base=TINY)
    store.pull(str(lora_dirs[1]), "ad-two")
    return home


@pytest.fixture(scope="module")
def lora_server(lora_home):
    """A real server over the adapter store, with "tiny" loaded."""
    with running_server(make_test_config(lora_home), ModelStore(lora_home), TINY) as info:
        yield info


@pytest.fixture
def sdk(lora_server):
    """The openai SDK pointed at the adapter server."""
    with openai.OpenAI(base_url=lora_server.base_url, api_key=lora_server.api_key, max_retries=0, timeout=120) as c:
        yield c


def _complete(sdk, model: str, tokens: int = 12) -> str:
    out = sdk.completions.create(model=model, prompt=PROMPT, max_tokens=tokens, temperature=0)
    assert out.model == model
    return out.choices[0].text


def _admin(server, path: str, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    return httpx.post(server.root + path, json=body, headers=headers, timeout=120)


def test_adapter_is_stored_as_lora(lora_home):
    """Pulled adapters are format lora / task adapter and record their base; the manifest round-trips."""
    store = ModelStore(lora_home)
    for name in ("ad-one", "ad-two"):
        m = store.show(name)
        assert (m.format, m.task, m.parameters["base_model"]) == ("lora", "adapter", TINY)
        assert Manifest.from_json(m.to_json()).task == "adapter"
    spec = store.resolve("ad-two")
    assert spec.base_model == TINY and spec.task == "adapter"
    assert read_manifest(store.show(TINY).path).task == "chat"


def test_adapter_changes_greedy_output(sdk):
    """The same greedy request gives different text through an adapter than through the base."""
    base = _complete(sdk, TINY)
    one = _complete(sdk, "ad-one")
    two = _complete(sdk, "ad-two")
    assert len({base, one, two}) == 3
    assert _complete(sdk, "ad-one") == one  # deterministic


def test_a_batch_of_one_adapter_skips_peft_per_row_gathers(sdk, monkeypatch):
    """A pass whose rows all use one adapter runs the layers' whole-batch path, not peft's mixed path.

    The mixed path gathers rows with Python lists: two blocking host-to-device copies per LoRA
    module per forward on a GPU. Solo outputs equal batched ones (the test below) and the merged model's.
    """
    from peft.tuners.lora import layer

    calls = []
    mixed = layer.Linear._mixed_batch_forward

    def counted(self, *args, **kwargs):
        calls.append(kwargs["adapter_names"])
        return mixed(self, *args, **kwargs)

    monkeypatch.setattr(layer.Linear, "_mixed_batch_forward", counted)
    assert _complete(sdk, "ad-one", 4) and _complete(sdk, TINY, 4)
    assert calls == []


def test_base_and_adapters_share_one_batch(sdk, lora_server):
    """Base and two adapters' requests run concurrently in one batch, each equal to its solo output."""
    models = [TINY, "ad-one", "ad-two"]
    solo = {m: _complete(sdk, m, 16) for m in models}
    engine = lora_server.engine
    before = engine.stats(TINY)
    results: dict[int, str] = {}
    barrier = threading.Barrier(6)

    def go(i: int) -> None:
        barrier.wait()
        results[i] = _complete(sdk, models[i % 3], 16)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(results[i] == solo[models[i % 3]] for i in range(6)), (results, solo)
    after = engine.stats(TINY)
    assert after.batched_steps > before.batched_steps
    assert after.max_batch >= 3


def test_adapters_listed_with_their_base(sdk, lora_server):
    """Loaded adapters appear in /v1/models and /admin/models with their base model."""
    _complete(sdk, "ad-one", 2)
    _complete(sdk, "ad-two", 2)
    models = {m.id: m for m in sdk.models.list().data}
    for name in ("ad-one", "ad-two"):
        x = models[name].model_extra["xllm"]
        assert x["loaded"] and x["details"]["base_model"] == TINY
    headers = {"Authorization": f"Bearer {lora_server.api_key}"}
    admin = httpx.get(lora_server.root + "/admin/models", headers=headers, timeout=30).json()["data"]
    by_id = {m["id"]: m for m in admin}
    assert by_id["ad-one"]["details"]["base_model"] == TINY
    assert set(by_id[TINY]["details"]["adapters"]) >= {"ad-one", "ad-two"}


def test_unload_adapter_keeps_base(sdk, lora_server, lora_dirs):
    """Unloading an adapter leaves the base serving unchanged; a path-loaded adapter is then 404."""
    base = _complete(sdk, TINY)
    one = _complete(sdk, "ad-one")
    lora_server.call(lora_server.engine.load_adapter(TINY, "ad-path", lora_dirs[0]))
    assert _complete(sdk, "ad-path") == one  # the same weights, loaded from their directory
    r = _admin(lora_server, "/admin/models/unload", {"model": "ad-path"})
    assert r.status_code == 200 and r.json()["unloaded"] is True
    with pytest.raises(openai.NotFoundError):
        _complete(sdk, "ad-path")
    assert lora_server.engine.is_loaded(TINY)
    assert _complete(sdk, TINY) == base
    # a stored adapter unloads the same way and loads again through the admin API
    assert _admin(lora_server, "/admin/models/unload", {"model": "ad-one"}).json()["unloaded"] is True
    assert not lora_server.engine.is_loaded("ad-one") and lora_server.engine.is_loaded(TINY)
    assert _complete(sdk, TINY) == base
    loaded = _admin(lora_server, "/admin/models/load", {"model": "ad-one"}).json()
    assert loaded["xllm"]["loaded"] and loaded["xllm"]["details"]["base_model"] == TINY
    assert _complete(sdk, "ad-one") == one


def test_adapter_errors_are_client_errors(sdk, lora_server, lora_dirs, tmp_path):
    """An adapter on a missing base or a non-adapter directory is a 4xx, and the server keeps serving."""
    store = ModelStore(lora_server.config.store.home)
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    for f in lora_dirs[0].iterdir():
        (orphan / f.name).write_bytes(f.read_bytes())
    store.pull(str(orphan), "ad-orphan", base="no-such-base")
    with pytest.raises(openai.BadRequestError) as err:
        _complete(sdk, "ad-orphan")
    assert "no-such-base" in str(err.value)
    with pytest.raises(Exception):
        lora_server.call(lora_server.engine.load_adapter(TINY, "ad-bad", tmp_path))
    assert _complete(sdk, TINY)


def test_an_adapter_whose_config_names_a_local_base_path_does_not_show_the_path(sdk, lora_server, lora_dirs):
    # found by a chaos run: peft writes the directory it trained on into adapter_config.json, and an adapter
    # pulled without a base quoted that server path to every user who asked for it
    store = ModelStore(lora_server.config.store.home)
    base_path = json.loads((lora_dirs[0] / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_path.startswith("/")
    store.pull(str(lora_dirs[0]), "ad-pathbase")  # no base given: its config's path is recorded
    with pytest.raises(openai.BadRequestError) as err:
        _complete(sdk, "ad-pathbase")
    message = err.value.response.json()["error"]["message"]
    assert base_path not in message and "/" not in message, message  # was "The base model '/tmp/...' of adapter"
    assert "ad-pathbase" in message and "--base" in message
    assert _complete(sdk, TINY)


def test_modelfile_adapter_is_merged(sdk, lora_server, lora_dirs):
    """`create` with FROM base + ADAPTER (a stored adapter or a path) serves base+adapter under the new name."""
    store = ModelStore(lora_server.config.store.home)
    one = _complete(sdk, "ad-one")
    made = store.create("tiny-one", f"FROM {TINY}\nADAPTER ad-one\n")
    assert made.parameters["adapter"] == "adapter" and any(f.path.startswith("adapter/") for f in made.files)
    assert store.verify("tiny-one")
    store.create("tiny-two", f"FROM {TINY}\nADAPTER {lora_dirs[1]}\n")
    assert _complete(sdk, "tiny-one") == one
    assert _complete(sdk, "tiny-two") == _complete(sdk, "ad-two")
    assert lora_server.call(lora_server.engine.unload("tiny-one")) and lora_server.call(lora_server.engine.unload("tiny-two"))


def test_detaching_an_adapter_after_a_one_adapter_pass_leaves_a_consistent_model(tiny_llama_dir, lora_dirs):
    """After a uniform pass activates an adapter on the layers, detaching it keeps mixed, base and uniform
    passes equal to a freshly built model's, peft's own record names no deleted adapter, and detaching
    all gives the base model back."""
    import torch
    from transformers import AutoModelForCausalLM

    from xllm_jupyter.backends.lora import LoraAdapters

    ids = torch.tensor([[1, 5, 9, 12], [3, 4, 5, 6]])

    def fresh() -> LoraAdapters:
        model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
        return LoraAdapters(model, torch.device("cpu"))

    def logits(adapters: LoraAdapters, rows) -> torch.Tensor:
        with torch.no_grad(), adapters.lock, adapters.forward(rows):
            return adapters.model(input_ids=ids[: len(rows)]).logits[:, -1]

    one, two = lora_dirs
    reference = fresh()
    with reference.lock:
        reference.attach("two", two)
        reference.attach("three", one)
    want = [logits(reference, rows) for rows in (["two", "three"], [None, None], ["two", "two"])]

    adapters = fresh()
    with adapters.lock:
        adapters.attach("one", one)
        adapters.attach("two", two)
    logits(adapters, ["one", "one"])  # every layer now has "one" active
    with adapters.lock:
        assert adapters.detach("one") and not adapters.detach("one")
        assert adapters._peft.active_adapter in adapters._peft.peft_config
        adapters.attach("three", one)
    got = [logits(adapters, rows) for rows in (["two", "three"], [None, None], ["two", "two"])]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))
    assert not torch.allclose(got[0][0], got[1][0], atol=1e-3)  # the adapters do change the output
    with adapters.lock:
        adapters.detach("two")
        adapters.detach("three")
    assert adapters.names() == [] and adapters._peft.active_adapter == []
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(adapters.model(input_ids=ids).logits[:, -1], plain(input_ids=ids).logits[:, -1],
                              atol=1e-5)


@pytest.mark.parametrize("change", ["repull", "rm"])
def test_an_adapter_repulled_or_removed_while_it_attaches_does_not_serve_its_old_files(
        tmp_path, tiny_llama_dir, lora_dirs, monkeypatch, change):
    """A forced re-pull (or `xllm rm`) of an adapter landing while it attaches: the adapter is attached again
    from the new files (or 404s); it went on serving the old ones until unloaded. The attach is held on its
    thread; no clock."""
    from concurrent.futures import ThreadPoolExecutor

    from xllm_jupyter.backends.hf_model import TransformersModel

    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    store.pull(str(lora_dirs[0]), "ad-x", base=TINY)
    attached, release, paths = threading.Event(), threading.Event(), []
    attach = TransformersModel.load_adapter

    def held(self, name, path):
        attach(self, name, path)
        if name == "ad-x":
            paths.append(path)
            if len(paths) == 1:
                attached.set()
                release.wait(300)

    monkeypatch.setattr(TransformersModel, "load_adapter", held)
    with running_server(make_test_config(home), ModelStore(home), TINY) as server, ThreadPoolExecutor(1) as pool, \
            openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=300) as sdk:
        asked = pool.submit(_complete, sdk, "ad-x")
        try:
            assert attached.wait(300), "ad-x was never attached"
            if change == "repull":
                r = _admin(server, "/admin/models/pull", {"model": str(lora_dirs[1]), "name": "ad-x", "force": True})
                assert r.status_code == 200 and '"success"' in r.text, r.text
            else:  # what `xllm rm` does: remove the files, then ask the server to unload
                store.rm("ad-x")
                r = _admin(server, "/admin/models/unload", {"model": "ad-x"})
                assert r.status_code == 200 and r.json()["unloaded"] is False, r.text
        finally:
            release.set()
        if change == "rm":
            with pytest.raises(openai.NotFoundError):  # was adapter one's output, from removed files
                asked.result(300)
            assert not server.engine.is_loaded("ad-x") and len(paths) == 1
            return
        got = asked.result(300)
        server.call(server.engine.load_adapter(TINY, "ref-one", lora_dirs[0]))
        server.call(server.engine.load_adapter(TINY, "ref-two", lora_dirs[1]))
        two, one = _complete(sdk, "ref-two"), _complete(sdk, "ref-one")
        assert two != one
        assert got == two and _complete(sdk, "ad-x") == two  # were adapter one's outputs
        assert len(paths) == 2  # attached again, from the new files


def test_a_request_arriving_while_an_attached_adapter_is_checked_waits_for_the_check(
        tmp_path, tiny_llama_dir, lora_dirs, monkeypatch):
    """A request for an adapter that arrives while the adapter, just attached, has its manifest read again (a
    re-pull's new files already there, its unload not yet asked) waits for that check as the attach's own
    waiters do: it got the old files' output. The read is held on its thread and let go once the second
    request is in the engine; no clock."""
    from concurrent.futures import ThreadPoolExecutor

    from xllm_jupyter.backends.hf_model import TransformersModel
    from xllm_jupyter.engine.loading import LoadingMixin

    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    store.pull(str(lora_dirs[0]), "ad-x", base=TINY)
    reading, release, arrived, attaches = threading.Event(), threading.Event(), threading.Event(), []
    facts, attach, load = ModelStore.facts, TransformersModel.load_adapter, LoadingMixin._load

    def counted(self, name, path):
        attach(self, name, path)
        attaches.append(name)

    def held(self, name):
        if name == "ad-x" and attaches and not reading.is_set():  # the check right after the first attach
            reading.set()
            release.wait(300)
        return facts(self, name)

    async def noted(self, name):
        if name == "ad-x" and reading.is_set() and not release.is_set():
            arrived.set()  # (no await before the original looks at the tables: it is in the engine by now)
        return await load(self, name)

    monkeypatch.setattr(TransformersModel, "load_adapter", counted)
    monkeypatch.setattr(ModelStore, "facts", held)
    monkeypatch.setattr(LoadingMixin, "_load", noted)
    with running_server(make_test_config(home), ModelStore(home), TINY) as server, ThreadPoolExecutor(2) as pool, \
            openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=300) as sdk:
        first = pool.submit(_complete, sdk, "ad-x")
        try:
            assert reading.wait(300), "ad-x was never checked after its attach"
            ModelStore(home).pull(str(lora_dirs[1]), "ad-x", base=TINY, force=True)  # the files of a re-pull
            second = pool.submit(_complete, sdk, "ad-x")
            assert arrived.wait(300), "the second request never reached the engine"
        finally:
            release.set()
        got = [first.result(300), second.result(300)]
        server.call(server.engine.load_adapter(TINY, "ref-one", lora_dirs[0]))
        server.call(server.engine.load_adapter(TINY, "ref-two", lora_dirs[1]))
        two, one = _complete(sdk, "ref-two"), _complete(sdk, "ref-one")
        assert two != one
        assert got == [two, two]  # the second was adapter one's output (or a 503 as the old files were detached)
        assert attaches.count("ad-x") == 2  # attached again, once, from the new files


def test_a_request_whose_adapter_is_unloaded_while_its_prompt_is_tokenized_gets_a_503_to_retry(
        tmp_path, tiny_llama_dir, lora_dirs, monkeypatch):
    """An unload (admin, or the one a re-pull or `xllm rm` asks for) landing while a request for the adapter
    tokenized its prompt: the request was answered 404 "does not exist" for a model that does; now a 503 to
    retry, as for a request whose adapter is unloaded while it generates. Tokenizing is held; no clock."""
    from concurrent.futures import ThreadPoolExecutor

    from xllm_jupyter.backends.hf_model import TransformersModel

    home = tmp_path / "home"
    store = ModelStore(home)
    store.pull(str(tiny_llama_dir), TINY)
    store.pull(str(lora_dirs[0]), "ad-x", base=TINY)
    holding, release = threading.Event(), threading.Event()
    tokenize = TransformersModel.tokenize

    def held(self, text, **kwargs):
        if "HOLD" in text:
            holding.set()
            release.wait(300)
        return tokenize(self, text, **kwargs)

    monkeypatch.setattr(TransformersModel, "tokenize", held)
    with running_server(make_test_config(home), ModelStore(home), TINY) as server, ThreadPoolExecutor(1) as pool, \
            openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=300) as sdk:
        before = _complete(sdk, "ad-x")  # attached
        asked = pool.submit(sdk.completions.create, model="ad-x", prompt="HOLD " + PROMPT, max_tokens=4)
        try:
            assert holding.wait(300), "the prompt was never tokenized"
            r = _admin(server, "/admin/models/unload", {"model": "ad-x"})
            assert r.status_code == 200 and r.json()["unloaded"] is True, r.text
        finally:
            release.set()
        with pytest.raises(openai.APIStatusError) as caught:
            asked.result(300)
        assert caught.value.status_code == 503, caught.value  # was a 404 "The model 'ad-x' does not exist"
        error = caught.value.response.json()["error"]
        assert error["code"] == "overloaded" and "ad-x" in error["message"] and "retry" in error["message"]
        assert _complete(sdk, "ad-x") == before  # the retry attaches it again


def _pull_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]


def test_an_adapter_pulled_over_http_with_a_base_serves_chat(sdk, lora_server, lora_dirs):
    """``base`` in the pull body (XllmClient.pull(base=...)) records the stored base its config's path is not."""
    from xllm_jupyter.client import XllmClient

    # lora_dirs[0]'s adapter_config.json names the directory it trained on: no stored model
    with XllmClient(lora_server.base_url, lora_server.api_key) as client:
        events = list(client.pull(str(lora_dirs[0]), name="ad-http", base=TINY))
    assert events[-1]["status"] == "success" and events[-1]["id"] == "ad-http", events
    assert ModelStore(lora_server.config.store.home).show("ad-http").parameters["base_model"] == TINY
    reply = sdk.chat.completions.create(model="ad-http", messages=[{"role": "user", "content": PROMPT}],
                                        max_tokens=8, temperature=0)
    assert reply.model == "ad-http" and reply.usage.completion_tokens > 0
    assert _complete(sdk, "ad-http") == _complete(sdk, "ad-one")  # the same adapter files on the same base


@pytest.mark.parametrize(("base", "status", "code"), [
    ("no-such-base", 404, "model_not_found"),
    ("../escape", 400, "invalid_model_name"),
    ("ad-one", 400, "store_error"),  # an adapter: adapters do not stack
    (7, 400, None),
])
def test_a_pull_with_a_bad_base_is_refused_before_pulling(lora_server, lora_dirs, base, status, code):
    """A base that is malformed or not stored: an OpenAI-shaped 4xx naming ``base``, and nothing is stored."""
    r = _admin(lora_server, "/admin/models/pull", {"model": str(lora_dirs[0]), "name": "ad-badbase", "base": base})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == "base" and set(error) == {"message", "type", "param", "code"}, error
    if code is not None:
        assert error["code"] == code
    assert str(lora_dirs[0]) not in error["message"]
    assert "ad-badbase" not in {m.name for m in ModelStore(lora_server.config.store.home).list()}


def test_a_base_for_a_model_that_is_not_an_adapter_is_an_error_event(lora_server, tiny_llama_dir):
    """``base`` on a pull of a full model: the store's error (param ``base``) ends the stream."""
    r = _admin(lora_server, "/admin/models/pull", {"model": str(tiny_llama_dir), "name": "tiny-nobase", "base": TINY})
    assert r.status_code == 200, r.text
    events = _pull_events(r)
    assert events and "error" in events[-1], events
    assert events[-1]["error"]["param"] == "base" and "not a LoRA adapter" in events[-1]["error"]["message"]


# ------------------------------------------------------------------ the base check in the store (pull, xllm pull --base)
def test_the_store_refuses_an_adapter_as_base_before_pulling(lora_home, lora_dirs):
    """``ModelStore.pull(base=ADAPTER)``: a StoreError naming ``base``, and nothing is stored (was recorded as given)."""
    from xllm_jupyter.core.errors import StoreError

    store = ModelStore(lora_home)
    with pytest.raises(StoreError) as err:
        store.pull(str(lora_dirs[0]), "ad-onad", base="AD-ONE")  # names are case-insensitive
    assert err.value.param == "base" and "itself a LoRA adapter" in err.value.message
    with pytest.raises(StoreError) as err:
        store.pull(str(lora_dirs[0]), "ad-self", base="ad-self")
    assert err.value.param == "base" and "its own base" in err.value.message
    assert not {"ad-onad", "ad-self"} & {m.name for m in store.list()}


def test_a_model_that_is_no_adapter_pulled_with_a_base_is_not_stored(lora_home, tiny_llama_dir):
    """A base given for a model that is no LoRA adapter: the StoreError naming ``base``, and nothing stored (it was
    installed first and refused after, so the caller heard of an error while the store had gained the model)."""
    from xllm_jupyter.core.errors import StoreError

    store = ModelStore(lora_home)
    with pytest.raises(StoreError) as err:
        store.pull(str(tiny_llama_dir), "tiny-with-base", base=TINY)
    assert err.value.param == "base" and "not a LoRA adapter" in err.value.message
    assert "tiny-with-base" not in {m.name for m in store.list()}


def test_a_cancel_as_an_adapter_installs_leaves_it_with_the_base_given(lora_home, lora_dirs, monkeypatch):
    """A pull cancelled right as its adapter went into models/: the adapter is there with the base it was pulled
    with, and the pull says so (it was installed with its config's base path, then the cancel stopped the base's
    write, and the caller got 'nothing was added')."""
    store = ModelStore(lora_home)
    cancel, install = threading.Event(), ModelStore._install

    def install_then_cancel(self, build, dirname):
        target = install(self, build, dirname)
        cancel.set()  # (the caller's client leaves, the server shuts down: just after the rename)
        return target

    monkeypatch.setattr(ModelStore, "_install", install_then_cancel)
    pulled = store.pull(str(lora_dirs[0]), "ad-cut", base=TINY, cancel=cancel)
    assert cancel.is_set() and pulled.parameters["base_model"] == TINY
    assert store.show("ad-cut").parameters["base_model"] == TINY


def test_the_store_records_a_base_not_pulled_yet_with_a_warning(lora_home, lora_dirs, caplog):
    """A base not stored yet is kept (it may be pulled later), but said; a malformed one names ``base``."""
    from xllm_jupyter.core.errors import InvalidModelName

    store = ModelStore(lora_home)
    with caplog.at_level("WARNING", logger="xllm_jupyter.store.store"):
        m = store.pull(str(lora_dirs[0]), "ad-early", base="base-later")
    assert m.parameters["base_model"] == "base-later"
    assert "'base-later' is not in the store" in caplog.text
    with pytest.raises(InvalidModelName) as err:
        store.pull(str(lora_dirs[0]), "ad-badname", base="../up")
    assert err.value.param == "base"
    store.rm("ad-early")


def test_xllm_pull_base_is_checked_by_the_store(lora_home, lora_dirs, monkeypatch, caplog):
    """`xllm pull --base`: an adapter as base is a one-line error and nothing is stored; a base not stored warns."""
    from click.testing import CliRunner

    from xllm_jupyter.cli.main import main

    monkeypatch.setenv("XLLM_HOME", str(lora_home))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    refused = CliRunner().invoke(main, ["pull", str(lora_dirs[0]), "--name", "ad-cli", "--base", "ad-two"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output, refused.output
    err = refused.stderr.strip()
    assert err.startswith("Error: ") and "itself a LoRA adapter" in err and "ad-two" in err, err
    assert "ad-cli" not in {m.name for m in ModelStore(lora_home).list()}
    with caplog.at_level("WARNING", logger="xllm_jupyter.store.store"):  # (stderr outside pytest's log capture)
        early = CliRunner().invoke(main, ["pull", str(lora_dirs[0]), "--name", "ad-cli", "--base", "cli-later"])
    assert early.exit_code == 0, early.output
    assert "Pulled ad-cli" in early.stdout and "'cli-later' is not in the store" in caplog.text, early.output
    assert ModelStore(lora_home).show("ad-cli").parameters["base_model"] == "cli-later"
    ModelStore(lora_home).rm("ad-cli")


def test_an_adapter_whose_base_became_an_adapter_is_a_400_not_a_retry(sdk, lora_server, lora_dirs):
    """An adapter pulled before its base, whose base name was then taken by another adapter: a 400 saying so
    (was a 503 "retry the request", which never passes), and the base and the other adapter keep serving."""
    store = ModelStore(lora_server.config.store.home)
    store.pull(str(lora_dirs[0]), "ad-upper", base="ad-lower")  # not stored yet: allowed, with a warning
    store.pull(str(lora_dirs[1]), "ad-lower")  # an adapter (its config names "tiny") takes the name
    for _ in range(2):  # the same answer again: nothing was left half-attached
        with pytest.raises(openai.BadRequestError) as err:
            _complete(sdk, "ad-upper")
        error = err.value.response.json()["error"]
        assert error["param"] == "model" and "itself a LoRA adapter" in error["message"], error
        assert "ad-upper" in error["message"] and "ad-lower" in error["message"] and "retry" not in error["message"]
    assert _complete(sdk, "ad-lower") == _complete(sdk, "ad-two")  # the same files on the same base
    assert _complete(sdk, TINY)
    # the engine's own attach refuses an adapter as base too, after loading it (it was not attached before)
    store.pull(str(lora_dirs[1]), "ad-lower2")
    with pytest.raises(Exception) as caught:
        lora_server.call(lora_server.engine.load_adapter("ad-lower2", "ad-path", lora_dirs[0]))
    assert getattr(caught.value, "status", None) == 400 and "is an adapter" in str(caught.value)


def test_an_adapter_leaves_with_its_base_and_says_so(sdk, lora_server):
    """An adapter goes when its base's keep_alive runs out: ``/admin/models`` (``xllm ps`` UNTIL) gives it the base's
    ``expires_at``; it had none, so `xllm ps` said the adapter stayed forever."""
    headers = {"Authorization": f"Bearer {lora_server.api_key}"}

    def admin_models() -> dict:
        data = httpx.get(lora_server.root + "/admin/models", headers=headers, timeout=30).json()["data"]
        return {m["id"]: m for m in data}

    kept = admin_models()[TINY]["expires_at"]
    try:
        sdk.completions.create(model="ad-one", prompt=PROMPT, max_tokens=1, temperature=0,
                               extra_body={"keep_alive": "10m"})
        models = admin_models()
        assert models[TINY]["expires_at"] is not None
        assert models["ad-one"]["expires_at"] == models[TINY]["expires_at"]
    finally:  # the module's later tests find the base kept as before
        if kept is None:
            sdk.completions.create(model=TINY, prompt=PROMPT, max_tokens=1, temperature=0, extra_body={"keep_alive": -1})


def test_polling_loaded_models_reads_no_manifest_for_an_adapter(sdk, lora_server, monkeypatch):
    """``/metrics`` and ``/admin/stats`` read ``loaded_models()`` on the IOLoop at every poll: an attached adapter made
    each read its base's manifest from disk (a digest it then dropped)."""
    _complete(sdk, "ad-one", 1)
    catalog = lora_server.engine.catalog
    reads: list[str] = []
    facts = catalog.facts
    monkeypatch.setattr(catalog, "facts", lambda name: reads.append(name) or facts(name))
    names = {info.name for info in lora_server.engine.loaded_models()}
    assert {TINY, "ad-one"} <= names
    assert reads == []
    headers = {"Authorization": f"Bearer {lora_server.api_key}"}
    assert httpx.get(lora_server.root + "/metrics", headers=headers, timeout=30).status_code == 200
    assert reads == []
