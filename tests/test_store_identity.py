"""A store's random id (store/identity.py): made once, the same for every process that asks, distinct per store.

Real stores in temp homes; the race is real threads meeting at a barrier on one fresh store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from xllm_jupyter.store import ModelStore
from xllm_jupyter.store.identity import STORE_ID_NAME, read_store_id, store_id


def test_an_id_is_made_once_and_kept(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    first = ModelStore(home).store_id()
    assert first is not None and len(first) == 32 and int(first, 16) >= 0
    assert ModelStore(home).store_id() == first == read_store_id(home)  # read back, not made again
    assert (home / STORE_ID_NAME).read_text() == first + "\n"
    assert (home / STORE_ID_NAME).stat().st_mode & 0o777 == 0o644  # readable by another user sharing the store
    assert sorted(p.name for p in home.iterdir()) == [STORE_ID_NAME]  # no temporary file left behind


def test_two_stores_holding_the_same_model_have_different_ids(tmp_path, tiny_llama_dir):
    a, b = ModelStore(tmp_path / "a"), ModelStore(tmp_path / "b")
    for store in (a, b):
        store.pull(str(tiny_llama_dir), "tiny")
    assert a.show("tiny").digest == b.show("tiny").digest
    assert a.store_id() and b.store_id() and a.store_id() != b.store_id()
    assert a.list() and [m.name for m in a.list()] == ["tiny"]  # the id file is no model


def test_makers_racing_on_a_fresh_store_all_get_the_one_id(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    start = threading.Barrier(16)

    def make() -> str | None:
        start.wait()
        return store_id(home)

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda _: make(), range(16)))
    assert len(set(ids)) == 1 and ids[0] == read_store_id(home), ids
    assert sorted(p.name for p in home.iterdir()) == [STORE_ID_NAME]


def test_another_process_reads_the_same_id(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code = "import sys; from xllm_jupyter.store.identity import store_id; print(store_id(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(home)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert outs == {read_store_id(home)} and None not in outs, outs


def test_no_store_yet_is_not_created_by_asking(tmp_path):
    home = tmp_path / "never-pulled"
    assert ModelStore(home).store_id() is None
    assert not home.exists()


def test_a_store_that_cannot_take_an_id_has_none(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()

    def no_links(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")  # a read-only store, or a file system without links

    monkeypatch.setattr(os, "link", no_links)
    assert store_id(home) is None
    assert list(home.iterdir()) == []  # its temporary file went too


@pytest.mark.parametrize("text", ["", "not-an-id\n", "abc\n", "G" * 32, "0" * 31 + "\n"])
def test_a_damaged_id_file_is_no_id(tmp_path, text):
    home = tmp_path / "home"
    home.mkdir()
    (home / STORE_ID_NAME).write_text(text)
    assert store_id(home) is None  # never taken for another store's, never silently replaced
    assert (home / STORE_ID_NAME).read_text() == text
