"""Hub pulls through the real huggingface_hub client against a local fake Hub (tests/fake_hub.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from xllm_jupyter.core.errors import ModelNotFound, StoreError
from xllm_jupyter.store import ModelStore, PullProgress

from .fake_hub import FakeHub
from .helpers import dirs_in
from .test_store_full_disk import small_fs  # noqa: F401 - a fixture

REPO = "tiny-org/Tiny-Llama"


@pytest.fixture(autouse=True)
def hub_env(monkeypatch, tmp_path):
    """Online for huggingface_hub in this scope only, with every cache and token path in tmp."""
    import huggingface_hub.constants as c

    hf_home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)  # read once at import; conftest had set it to 1
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(c, "HF_HOME", str(hf_home))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield
    assert not (Path.home() / ".cache" / "huggingface" / "hub" / "models--tiny-org--Tiny-Llama").exists()


@pytest.fixture
def hub(tiny_llama_dir):
    """A fake Hub serving the tiny Llama as tiny-org/Tiny-Llama."""
    with FakeHub() as server:
        server.add_repo(REPO, FakeHub.files_of(tiny_llama_dir))
        yield server


@pytest.fixture
def store(tmp_path, hub) -> ModelStore:
    """A store pointed at the fake Hub."""
    return ModelStore(tmp_path / "home", endpoint=hub.url)


def assert_matches_source(m, source_dir: Path) -> None:
    for f in m.files:
        data = (m.path / f.path).read_bytes()
        assert f.sha256 == hashlib.sha256(data).hexdigest() == hashlib.sha256((source_dir / f.path).read_bytes()).hexdigest()
        assert f.size == len(data)


def test_hub_pull(store, hub, tiny_llama_dir):
    events: list[PullProgress] = []
    m = store.pull(f"hf:{REPO}", progress=events.append)
    assert m.name == "tiny-llama" and m.format == "safetensors" and m.source == f"hf:{REPO}"
    assert m.revision == hub.repos[REPO.lower()].commit
    assert {f.path for f in m.files} == set(FakeHub.files_of(tiny_llama_dir))
    assert_matches_source(m, tiny_llama_dir)
    assert m.template and "<|im_start|>" in m.template
    assert not (m.path / ".cache").exists() and store.verify("tiny-llama")
    assert [x.name for x in store.list()] == ["tiny-llama"]
    assert store.resolve("tiny-llama").path == m.path
    stages = {e.stage for e in events}
    assert {"download", "verify", "done"} <= stages
    big = [e for e in events if e.stage == "download" and e.file == "model.safetensors"]
    assert big[-1].done == big[-1].total == (tiny_llama_dir / "model.safetensors").stat().st_size
    assert dirs_in(store.tmp) == []


def test_hf_endpoint_env_and_bare_repo_id(tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    store = ModelStore(tmp_path / "home2")
    m = store.pull(REPO, name="t:v1", revision="main")
    assert m.name == "t:v1" and m.path.name == "t@v1" and store.show("T:V1") == m


def test_same_commit_is_a_noop_and_a_new_commit_updates(store, hub, tiny_llama_dir):
    m1 = store.pull(f"hf:{REPO}")
    n = len(hub.log)
    assert store.pull(f"hf:{REPO}") == m1
    assert [p for _, p, _ in hub.log[n:] if "/resolve/" in p] == []  # only the revision lookup
    files = FakeHub.files_of(tiny_llama_dir)
    files["config.json"] = files["config.json"].replace(b'"hidden_act"', b'"hidden_act" ', 1)
    hub.add_repo(REPO, files)  # a new commit on main
    m2 = store.pull(f"hf:{REPO}")
    assert m2.revision != m1.revision and m2.digest != m1.digest
    assert (m2.path / "config.json").read_bytes() == files["config.json"] and store.verify("tiny-llama")
    assert [x.name for x in store.list()] == ["tiny-llama"] and dirs_in(store.tmp) == []


def test_dropped_connection_is_resumed_with_a_range_request(store, hub, tiny_llama_dir):
    from huggingface_hub import constants

    # huggingface_hub writes in DOWNLOAD_CHUNK_SIZE pieces, so a cut past the first one resumes from it
    chunk, size = constants.DOWNLOAD_CHUNK_SIZE, (tiny_llama_dir / "model.safetensors").stat().st_size
    if size <= chunk:
        pytest.skip("the tiny model's weights fit in one download chunk")
    hub.drop_once("model.safetensors", after=chunk + (size - chunk) // 2)
    m = store.pull(f"hf:{REPO}")
    assert hub.gets("model.safetensors") == [None, f"bytes={chunk}-"]  # resumed with a Range request
    assert_matches_source(m, tiny_llama_dir)
    assert store.verify("tiny-llama")


def test_interrupted_pull_fails_cleanly_and_a_retry_resumes(store, hub, tiny_llama_dir):
    hub.outage("model.safetensors")
    with pytest.raises(StoreError, match="pull again to resume") as info:  # the finished files are kept
        store.pull(f"hf:{REPO}")
    assert "Traceback" not in info.value.message and str(store.home) not in info.value.message
    assert store.list() == [] and dirs_in(store.models) == []
    with pytest.raises(ModelNotFound):
        store.show("tiny-llama")
    hub.recover()
    m = store.pull(f"hf:{REPO}")
    assert_matches_source(m, tiny_llama_dir)
    assert store.verify("tiny-llama")
    # files the failed attempt had completed were not downloaded again
    assert len(hub.gets("config.json")) == 1 and len(hub.gets("chat_template.jinja")) == 1
    assert dirs_in(store.tmp) == []


def test_corrupted_download_is_rejected(store, hub, tiny_llama_dir):
    hub.repos[REPO.lower()].corrupt.add("tokenizer.json")
    with pytest.raises(StoreError, match="verification"):
        store.pull(f"hf:{REPO}")
    assert store.list() == [] and dirs_in(store.models) == []
    hub.repos[REPO.lower()].corrupt.clear()
    m = store.pull(f"hf:{REPO}")  # the bad file was dropped; the retry fetches it again
    assert_matches_source(m, tiny_llama_dir)
    assert len(hub.gets("tokenizer.json")) == 2 and len(hub.gets("model.safetensors")) == 1


def test_a_callback_abort_keeps_progress_for_the_retry(store, hub, tiny_llama_dir):
    class Cancel(Exception):
        pass

    def progress(event: PullProgress) -> None:
        if event.file == "tokenizer.json":
            raise Cancel()

    with pytest.raises(Cancel):
        store.pull(f"hf:{REPO}", progress=progress)
    assert store.list() == []
    m = store.pull(f"hf:{REPO}")
    assert_matches_source(m, tiny_llama_dir)
    assert len(hub.gets("model.safetensors")) == 1


@pytest.mark.parametrize(
    "source, revision, match",
    [
        ("hf:tiny-org/no-such-repo", None, "not found"),
        (f"hf:{REPO}", "no-such-branch", "Revision"),
        (f"hf:{REPO}/missing.gguf", None, "not in the repository"),
    ],
)
def test_hub_errors_are_clear(store, source, revision, match):
    with pytest.raises(StoreError, match=match):
        store.pull(source, revision=revision)
    assert store.list() == []


def test_unreachable_hub_and_offline_mode(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = ModelStore(tmp_path / "home", endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(StoreError, match="Could not reach") as info:
        store.pull(f"hf:{REPO}")
    # nothing was downloaded, so there is nothing to resume
    assert info.value.message.endswith("; pull again"), info.value.message
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(StoreError, match="HF_HUB_OFFLINE"):
        store.pull(f"hf:{REPO}")


def test_only_downloaded_bytes_count_as_something_to_resume(tmp_path):
    """A pull's download directory with only huggingface_hub's empty locks and notes has nothing to resume."""
    from xllm_jupyter.store.hub import kept_data

    dest = tmp_path / "staging"
    assert not kept_data(dest)
    notes = dest / ".cache" / "huggingface" / "download"
    notes.mkdir(parents=True)
    (notes / "model.safetensors.lock").write_bytes(b"")
    (notes / "config.json.metadata").write_text("sha\netag\n1\n")
    (notes / "model.safetensors.incomplete").write_bytes(b"")
    assert not kept_data(dest)
    (notes / "model.safetensors.incomplete").write_bytes(b"part")
    assert kept_data(dest)


def test_gguf_repo(tmp_path, hub, tiny_llama_dir):
    gguf_bytes = make_gguf_bytes(tmp_path)
    hub.add_repo("gguf-org/Tiny-GGUF", {"README.md": b"# tiny\n", "a-Q4.gguf": gguf_bytes, "b-Q8.gguf": gguf_bytes})
    store = ModelStore(tmp_path / "home", endpoint=hub.url)
    with pytest.raises(StoreError, match="Several GGUF files"):
        store.pull("hf:gguf-org/Tiny-GGUF")
    m = store.pull("hf:gguf-org/Tiny-GGUF/b-Q8.gguf")
    assert m.name == "tiny-gguf" and m.format == "gguf" and [f.path for f in m.files] == ["b-Q8.gguf"]
    assert m.template == "{{ messages }}" and m.source == "hf:gguf-org/Tiny-GGUF/b-Q8.gguf"
    assert store.resolve("tiny-gguf").path == m.path / "b-Q8.gguf"


def test_gguf_repo_quantization_tag_as_ollama_spells_it(tmp_path, hub, tiny_llama_dir):
    """``hf.co/ORG/REPO:QUANT`` (Ollama's way to pull one quantization of a Hub GGUF repo) was refused as an invalid
    repo id; it pulls the GGUF file of that quantization, named ``repo:quant``."""
    gguf_bytes = make_gguf_bytes(tmp_path)
    hub.add_repo("gguf-org/Tiny-GGUF", {"README.md": b"# tiny\n", "Tiny-Q4_K_M.gguf": gguf_bytes,
                                        "Tiny-Q4_K_S.gguf": gguf_bytes, "Tiny-Q8_0-00001-of-00002.gguf": gguf_bytes,
                                        "Tiny-Q8_0-00002-of-00002.gguf": gguf_bytes})
    store = ModelStore(tmp_path / "home", endpoint=hub.url)
    m = store.pull("hf.co/gguf-org/Tiny-GGUF:Q4_K_M")
    assert m.name == "tiny-gguf:q4_k_m" and [f.path for f in m.files] == ["Tiny-Q4_K_M.gguf"]
    assert m.source == "hf:gguf-org/Tiny-GGUF:Q4_K_M"
    assert store.pull("hf:gguf-org/Tiny-GGUF:q4_k_m").digest == m.digest  # the same source again: as stored
    with pytest.raises(StoreError, match=r"Several GGUF files for 'Q8_0'.*Tiny-Q8_0-00001-of-00002.gguf"):
        store.pull("hf.co/gguf-org/Tiny-GGUF:Q8_0")
    with pytest.raises(StoreError, match=r"No GGUF file for 'Q4_K' .*Tiny-Q4_K_M.gguf, Tiny-Q4_K_S.gguf"):
        store.pull("hf.co/gguf-org/Tiny-GGUF:Q4_K")  # a tag matches a whole quantization name, not a part of one
    with pytest.raises(StoreError, match="Invalid quantization tag"):
        store.pull("hf.co/gguf-org/Tiny-GGUF:Q4+K")
    assert [x.name for x in store.list()] == ["tiny-gguf:q4_k_m"]


def test_a_gguf_repo_without_a_tag_gives_q4_k_m_or_the_nearest_below_as_ollama_does(tmp_path, hub, monkeypatch):
    """``hf.co/ORG/REPO`` of several GGUF files pulls Q4_K_M, as Ollama does (the Hub's default), else the largest
    quantization below it, else the smallest above it; it was the error "Several GGUF files". Through `xllm pull`."""
    from click.testing import CliRunner

    from xllm_jupyter.cli.main import main

    gguf_bytes = make_gguf_bytes(tmp_path)
    repos = {"org/Both-GGUF": ["Both-Q8_0.gguf", "Both-Q4_K_M.gguf", "Both-Q4_K_S.gguf", "Both-Q2_K.gguf"],
             "org/Below-GGUF": ["Below-F16.gguf", "Below-Q8_0.gguf", "Below-Q4_0.gguf", "Below-IQ2_XS.gguf"],
             "org/Above-GGUF": ["Above-BF16.gguf", "Above-Q6_K.gguf", "Above-Q5_K_M-00001-of-00002.gguf",
                                "Above-Q5_K_M-00002-of-00002.gguf"],
             "org/Unknown-GGUF": ["a-Q4.gguf", "b-Q8.gguf"]}
    for repo, files in repos.items():
        hub.add_repo(repo, {"README.md": b"# tiny\n", **{f: gguf_bytes for f in files}})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("XLLM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    monkeypatch.setenv("XLLM_BASE_URL", "http://127.0.0.1:9/v1")  # no server to unload from

    def pull(source: str):
        return CliRunner().invoke(main, ["pull", source], catch_exceptions=False)

    store = ModelStore(tmp_path / "home")
    for source, name, file in (("hf.co/org/Both-GGUF", "both-gguf", "Both-Q4_K_M.gguf"),
                               ("hf.co/org/Below-GGUF:latest", "below-gguf", "Below-Q4_0.gguf"),
                               ("huggingface.co/org/Above-GGUF", "above-gguf", "Above-Q6_K.gguf")):  # the split Q5_K_M: no
        result = pull(source)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"Pulled {name} (gguf") and file in result.stderr  # the progress names the file
        m = store.show(name)
        assert [f.path for f in m.files] == [file] and m.source == f"hf:{source.split('/', 1)[1].removesuffix(':latest')}"
    result = pull("hf.co/org/Unknown-GGUF")  # no file names a quantization: which one is the user's to say
    assert result.exit_code == 1 and "Several GGUF files (a-Q4.gguf, b-Q8.gguf): pick one as" in result.stderr
    assert store.pull("hf:org/Both-GGUF").digest == store.show("both-gguf").digest  # again: the same file, a no-op


def make_gguf_bytes(tmp_path: Path) -> bytes:
    import gguf
    import numpy as np

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_chat_template("{{ messages }}")
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()




def test_a_hub_that_never_answers_fails_within_the_timeout(tmp_path, monkeypatch):
    """An endpoint that accepts connections and never answers (a dead proxy) fails the pull in seconds, not never."""
    import socket
    import threading
    import time

    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel accepts connections; nobody reads or answers them
        store = ModelStore(tmp_path / "home", endpoint=f"http://127.0.0.1:{listener.getsockname()[1]}")
        outcome: list[BaseException] = []

        def pull() -> None:
            try:
                store.pull(f"hf:{REPO}")
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        started = time.monotonic()
        worker = threading.Thread(target=pull, daemon=True)
        worker.start()
        worker.join(15)
        elapsed = time.monotonic() - started
    worker.join(15)  # closing the listener ends a pull that was still waiting (the old code's hang)
    assert elapsed < 10, f"the pull was still waiting after {elapsed:.0f} s"
    assert len(outcome) == 1 and isinstance(outcome[0], StoreError), outcome
    assert "did not answer in time" in outcome[0].message
    assert store.list() == []


def test_a_cancelled_hub_pull_stops_mid_download_and_a_retry_resumes(store, hub, tiny_llama_dir):
    import threading

    from xllm_jupyter.core.errors import PullStopped

    cancel = threading.Event()

    def progress(event: PullProgress) -> None:
        if event.file == "tokenizer.json":
            cancel.set()  # (what a shutdown's cancel_pulls does): huggingface_hub's next chunk report stops it

    with pytest.raises(PullStopped):
        store.pull(f"hf:{REPO}", progress=progress, cancel=cancel)
    assert store.list() == [] and dirs_in(store.models) == []
    m = store.pull(f"hf:{REPO}")  # the files it completed stay in its staging directory for this retry
    assert_matches_source(m, tiny_llama_dir)
    assert len(hub.gets("model.safetensors")) == 1 and dirs_in(store.tmp) == []


def test_a_download_that_fills_the_disk_says_so_and_resumes_once_there_is_room(small_fs, hub):  # noqa: F811
    fs = small_fs(4)  # the tiny Llama's files are ~16 MB
    store = ModelStore(fs / "home", endpoint=hub.url)
    with pytest.raises(StoreError) as info:
        store.pull(f"hf:{REPO}", "tiny")
    assert info.value.message.startswith("Not enough disk space")  # (the Hub client's words for it)
    assert store.list() == [] and dirs_in(store.models) == []
    assert [d for d in dirs_in(store.tmp) if d.startswith("hub-")]  # what came down is kept for the retry
    small_fs.grow(fs, 64)  # room made
    assert store.pull(f"hf:{REPO}", "tiny").name == "tiny"
    assert dirs_in(store.tmp) == [] and store.verify("tiny")
