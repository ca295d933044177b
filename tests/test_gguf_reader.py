"""GGUF files are read through a plain numpy array (backends/gguf_reader.py): the same fields and tensors as
gguf's own reader, without a memmap slice per value (a vocabulary's 400,000 of them took seconds a read)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from xllm_jupyter.backends.gguf_reader import fast_gguf_reads, read_gguf, reader_class
from xllm_jupyter.backends.memory_estimate import gguf_expanded_bytes
from xllm_jupyter.store.convert import gguf_metadata

VOCAB = [f"tok{i}" for i in range(2000)]


def _gguf(path: Path) -> Path:
    """A small GGUF with what a model's file has: strings, numbers, a vocabulary, float and quantized-size tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.add_file_type(1)
    writer.add_block_count(2)
    writer.add_token_list(VOCAB)
    writer.add_token_scores([float(i) / 7 for i in range(len(VOCAB))])
    writer.add_token_types([1] * len(VOCAB))
    writer.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.add_tensor("output_norm.weight", np.linspace(0, 1, 16, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _view(reader) -> tuple[list, list]:
    fields = [(f.name, f.offset, list(f.types), list(f.data), [p.tolist() for p in f.parts]) for f in reader.fields.values()]
    tensors = [(t.name, t.tensor_type, t.shape.tolist(), t.n_elements, t.n_bytes, t.data_offset, t.data.tolist())
               for t in reader.tensors]
    return fields, tensors


def test_the_plain_reader_reads_what_ggufs_own_reader_reads(tmp_path):
    path = _gguf(tmp_path / "m.gguf")
    ours, theirs = read_gguf(path), gguf.gguf_reader.GGUFReader(str(path))
    assert _view(ours) == _view(theirs)
    assert ours.fields["tokenizer.ggml.tokens"].contents() == VOCAB
    assert type(ours.data) is np.ndarray and not ours.data.flags.writeable  # read-only, as the mapping is


def test_metadata_and_size_reads_slice_no_memmap_per_value(tmp_path, monkeypatch):
    path = _gguf(tmp_path / "m.gguf")
    finalized = []
    finalize = np.memmap.__array_finalize__
    monkeypatch.setattr(np.memmap, "__array_finalize__", lambda self, obj: (finalized.append(1), finalize(self, obj))[1])
    meta = gguf_metadata(path)
    assert gguf_expanded_bytes(path, 2) == (64 + 16) * 2
    assert meta == {"general.architecture": "llama", "general.file_type": 1,
                    "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    # gguf's own reader: some 3 slices per vocabulary entry, 12,000 here; ours: the mapping itself
    assert len(finalized) < 10


def test_transformers_gguf_loads_build_the_plain_reader(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf, "GGUFReader", gguf.GGUFReader)  # put back after the test
    fast_gguf_reads()
    from gguf import GGUFReader  # what transformers' load_gguf_checkpoint does at each call

    assert GGUFReader is reader_class() and issubclass(GGUFReader, gguf.gguf_reader.GGUFReader)
    assert type(GGUFReader(str(_gguf(tmp_path / "m.gguf"))).data) is np.ndarray


def test_an_unreadable_file_raises_as_ggufs_reader_does(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(ValueError, match="GGUF magic invalid"):
        read_gguf(bad)
    assert gguf_expanded_bytes(bad, 2) == 0


def test_transformers_gguf_loads_build_each_table_of_tensor_names_once(monkeypatch):
    from gguf.tensor_mapping import TensorNameMap

    monkeypatch.setattr(gguf, "get_tensor_name_map", gguf.get_tensor_name_map)  # put back after the test
    fast_gguf_reads()
    from gguf import MODEL_ARCH, get_tensor_name_map  # as transformers' get_gguf_hf_weights_map does, per module

    first = get_tensor_name_map(MODEL_ARCH.LLAMA, 30)
    assert get_tensor_name_map(MODEL_ARCH.LLAMA, 30) is first  # built once
    assert first.mapping == TensorNameMap(MODEL_ARCH.LLAMA, 30).mapping  # the table gguf builds
    assert get_tensor_name_map(MODEL_ARCH.LLAMA, 2).mapping == TensorNameMap(MODEL_ARCH.LLAMA, 2).mapping != first.mapping
