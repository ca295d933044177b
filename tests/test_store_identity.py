"""A store's random id (store/identity.py): made once, the same for every process that asks, distinct per store,
and remade in a copy of the store (kept where the store is moved or reached by another path).

Real stores in temp homes, copied with the real ``cp``; the races are real threads meeting at a barrier.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from xllm_jupyter.store import ModelStore
from xllm_jupyter.store.identity import STORE_ID_NAME, read_store_id, store_id


def test_an_id_is_made_once_and_kept(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    first = ModelStore(home).store_id()
    assert first is not None and len(first) == 32 and int(first, 16) >= 0
    assert ModelStore(home).store_id() == first == read_store_id(home)  # read back, not made again
    ino = (home / STORE_ID_NAME).stat().st_ino
    assert (home / STORE_ID_NAME).read_text() == f"{first}\ninodes {ino} {home.stat().st_ino}\n"  # where it was made
    assert (home / STORE_ID_NAME).stat().st_mode & 0o777 == 0o644  # readable by another user sharing the store
    assert sorted(p.name for p in home.iterdir()) == [STORE_ID_NAME]  # no temporary file left behind


def test_two_stores_holding_the_same_model_have_different_ids(tmp_path, tiny_llama_dir):
    a, b = ModelStore(tmp_path / "a"), ModelStore(tmp_path / "b")
    for store in (a, b):
        store.pull(str(tiny_llama_dir), "tiny")
    assert a.show("tiny").digest == b.show("tiny").digest
    assert a.store_id() and b.store_id() and a.store_id() != b.store_id()
    assert a.list() and [m.name for m in a.list()] == ["tiny"]  # the id file is no model


def _ids_asked_at_once(home: Path, threads: int = 16) -> list[str | None]:
    """``store_id(home)`` from ``threads`` threads let go at the same moment, their answers."""
    start = threading.Barrier(threads)

    def ask() -> str | None:
        start.wait()
        return store_id(home)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: ask(), range(threads)))


def test_makers_racing_on_a_fresh_store_all_get_the_one_id(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    ids = _ids_asked_at_once(home)
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


def made_store(path, tiny_llama_dir=None):
    """A store at ``path`` that has its id (and the tiny Llama as "tiny" when given)."""
    store = ModelStore(path)
    if tiny_llama_dir is not None:
        store.pull(str(tiny_llama_dir), "tiny")
    else:
        path.mkdir(parents=True)
    assert store.store_id() is not None
    return store


@pytest.mark.parametrize("how", [["cp", "-r"], ["cp", "-a"], ["cp", "-al"], "copytree"])
def test_a_copied_store_takes_an_id_of_its_own(tmp_path, how):
    """``cp -r`` of a store used to give two stores one id (the docs said to delete ``store-id`` in the copy); the
    copy now takes its own on first ask, the original keeps its, and each stays put. ``cp -al`` hard-links the
    copy's id file to the original's: replacing it must leave the original's alone."""
    original = made_store(tmp_path / "a")
    first = original.store_id()
    if how == "copytree":
        shutil.copytree(original.home, tmp_path / "b", symlinks=True)
    else:
        subprocess.run([*how, str(original.home), str(tmp_path / "b")], check=True)
    assert read_store_id(tmp_path / "b") == first  # the copied file, as it was
    copy = ModelStore(tmp_path / "b")
    second = copy.store_id()
    assert second is not None and second != first
    assert copy.store_id() == second == ModelStore(tmp_path / "b").store_id()  # made once, then kept
    assert original.store_id() == first and read_store_id(original.home) == first
    assert sorted(p.name for p in copy.home.iterdir()) == ["locks", STORE_ID_NAME]  # no temporary file left behind


def test_a_moved_store_or_one_reached_by_another_path_keeps_its_id(tmp_path):
    store = made_store(tmp_path / "a")
    first = store.store_id()
    os.rename(tmp_path / "a", tmp_path / "moved")  # `mv` on one file system
    assert ModelStore(tmp_path / "moved").store_id() == first
    (tmp_path / "link").symlink_to(tmp_path / "moved", target_is_directory=True)
    assert ModelStore(tmp_path / "link").store_id() == first
    os.mkdir(tmp_path / "parent")
    os.rename(tmp_path / "moved", tmp_path / "parent" / "store")  # into another directory
    assert ModelStore(tmp_path / "parent" / "store").store_id() == first
    assert read_store_id(tmp_path / "parent" / "store") == first


def test_a_bind_mounted_store_keeps_its_id(tmp_path):
    store = made_store(tmp_path / "a")
    (tmp_path / "mnt").mkdir()
    if subprocess.run(["mount", "--bind", str(store.home), str(tmp_path / "mnt")], capture_output=True).returncode:
        pytest.skip("bind mounts need privileges this machine does not give")
    try:
        assert ModelStore(tmp_path / "mnt").store_id() == store.store_id()
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], check=True)


def test_an_id_file_from_before_copy_detection_is_remade_once(tmp_path):
    """A file holding only the id (what earlier versions wrote) says nothing of where it was made: it may be a copy's,
    so the store takes a fresh id, once."""
    home = tmp_path / "home"
    home.mkdir()
    (home / STORE_ID_NAME).write_text("0123456789abcdef" * 2 + "\n")
    fresh = store_id(home)
    assert fresh is not None and fresh != "0123456789abcdef" * 2
    assert store_id(home) == fresh == read_store_id(home)


def test_processes_racing_on_a_copy_all_get_the_one_new_id(tmp_path):
    original = made_store(tmp_path / "a")
    shutil.copytree(original.home, tmp_path / "b")
    copy = tmp_path / "b"
    ids = _ids_asked_at_once(copy)
    assert len(set(ids)) == 1 and ids[0] == read_store_id(copy) != original.store_id(), ids
    assert sorted(p.name for p in copy.iterdir()) == ["locks", STORE_ID_NAME]
    code = "import sys; from xllm_jupyter.store.identity import store_id; print(store_id(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(copy)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    assert {p.communicate(timeout=120)[0].strip() for p in procs} == {ids[0]}  # other processes see it as made


def test_a_copy_that_cannot_be_written_has_no_id(tmp_path, monkeypatch):
    """A read-only copy cannot take its own id, and its original's is no answer: none."""
    original = made_store(tmp_path / "a")
    shutil.copytree(original.home, tmp_path / "b")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", read_only)
    assert store_id(tmp_path / "b") is None
    assert read_store_id(tmp_path / "b") == original.store_id()  # left as it was
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name != "locks") == [STORE_ID_NAME]


def test_xllm_rm_tells_a_server_on_a_copy_of_its_store_apart(tmp_path, tiny_llama_dir):
    """The case the id exists for, on a copy: a server serving from a ``cp -r`` of the store is not serving from the
    store ``xllm rm`` removes from (before, both had one id and the CLI said it was)."""
    from tests.server_fixtures import API_KEY, make_test_config, running_server
    from xllm_jupyter.cli.store_cmds import _served_from
    from xllm_jupyter.client import XllmClient

    original = made_store(tmp_path / "a", tiny_llama_dir)
    subprocess.run(["cp", "-r", str(original.home), str(tmp_path / "b")], check=True)
    copy = ModelStore(tmp_path / "b")
    with running_server(make_test_config(copy.home), copy, "tiny") as info, \
            XllmClient(info.base_url, API_KEY) as admin:
        asks = type("Settings", (), {"client": lambda self: admin})()
        assert admin.manifest("tiny")["store_id"] == copy.store_id() != original.store_id()
        assert _served_from(copy, asks, "tiny")
        assert not _served_from(original, asks, "tiny")


def test_two_replacing_a_copy_s_id_at_once_report_the_one_it_keeps(tmp_path, monkeypatch):
    """Two processes that both judged a copy's id file stale both replaced it: the first could read its own id back
    and report it just before the second's replaced it (the store then had another id than the one reported). Here
    the rival asks exactly between the first's check and its replace; both must report the id the file keeps."""
    original = made_store(tmp_path / "a")
    shutil.copytree(original.home, tmp_path / "b")
    copy = tmp_path / "b"
    real_replace = os.replace
    rival: dict[str, str | None] = {}
    askers: list[threading.Thread] = []

    def replace_after_a_rival(src, dst):
        if not rival and str(dst).endswith(STORE_ID_NAME):
            rival["id"] = None
            asker = threading.Thread(target=lambda: rival.update(id=store_id(copy)))
            askers.append(asker)
            asker.start()
            asker.join(2)  # it either replaces first (as before) or waits its turn (then it ends after ours)
            return real_replace(src, dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_a_rival)
    mine = store_id(copy)
    for asker in askers:  # (after ours has let go of its turn: joined inside it, a rival waiting its turn never ends)
        asker.join(60)
        assert not asker.is_alive()
    assert mine is not None and mine != original.store_id()
    assert rival["id"] == mine == read_store_id(copy) == store_id(copy)
