"""backends/native_libs.py: torch's native libraries loaded before ``import torch`` (with the GIL released, which
is benchmarks/first_use_stall.py's to show), once, and torch then works as ever. Fresh interpreters: a test
process has torch imported already."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's dlopen")

SCRIPT = textwrap.dedent("""
    import json, sys
    from xllm_jupyter.backends import native_libs

    def mapped():
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if "libtorch_cpu" in line})

    first = native_libs.preload_torch()
    before_import = mapped()
    again = native_libs.preload_torch()
    import torch
    out = {"first": first, "again": again, "torch_before": "torch" in sys.modules, "before_import": before_import,
           "after_import": mapped(), "product": (torch.ones(2, 3) @ torch.ones(3, 2)).tolist(),
           "library": str(native_libs.torch_library())}
    print(json.dumps(out))
""")


def run(script: str, **env: str) -> dict:
    import os

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_torch_libraries_are_loaded_before_the_import_and_torch_works():
    pytest.importorskip("torch")
    got = run(SCRIPT)
    assert got["first"] is True and got["again"] is False  # once per process
    assert got["library"].endswith("/torch/lib/libtorch.so")
    assert len(got["before_import"]) == 1 and "/torch/lib/" in got["before_import"][0]  # loaded, torch not imported
    assert got["after_import"] == got["before_import"]  # the import used those: one copy, the same file
    assert got["product"] == [[3.0, 3.0], [3.0, 3.0]]


def test_nothing_is_loaded_once_torch_is_imported_or_torch_loads_its_own_way():
    pytest.importorskip("torch")
    imported = run("import json, torch\nfrom xllm_jupyter.backends import native_libs\n"
                   "print(json.dumps(native_libs.preload_torch()))\n")
    assert imported is False
    global_way = run("import json\nfrom xllm_jupyter.backends import native_libs\n"
                     "print(json.dumps(native_libs.preload_torch()))\n", TORCH_USE_RTLD_GLOBAL="1")
    assert global_way is False


def test_choosing_a_backend_loads_them_before_it_imports_torch():
    pytest.importorskip("torch")
    script = textwrap.dedent("""
        import json, sys
        from xllm_jupyter.backends import native_libs, registry
        calls = []
        real = native_libs.preload_torch
        def preload():
            calls.append("torch" in sys.modules)
            return real()
        registry.preload_torch = preload
        registry.get_backend("transformers")
        print(json.dumps({"calls": calls, "torch": "torch" in sys.modules, "handles": len(native_libs._handles)}))
    """)
    got = run(script)
    assert got == {"calls": [False], "torch": True, "handles": 1}


def test_an_embedding_loads_where_auto_question_imports_torch_the_same_way():
    # the embedding path asks device_kind("auto") before its backend imports anything: that was the process's
    # first import of torch, with the import's own GIL-held dlopen and full collections running meanwhile
    pytest.importorskip("torch")
    script = textwrap.dedent("""
        import gc, json, sys
        from xllm_jupyter.backends import native_libs, torch_device
        from xllm_jupyter.core import gc_freeze
        gc.freeze()  # what the engine's start does: only what the import makes is unfrozen
        kind = torch_device.device_kind("auto")
        print(json.dumps({"kind": kind, "handles": len(native_libs._handles), "torch": "torch" in sys.modules,
                          "torch_frozen": gc_freeze.is_frozen(sys.modules["torch"].Tensor),
                          "resumed": gc.get_threshold()[2] != gc_freeze.NO_FULL_COLLECTIONS}))
    """)
    got = run(script)
    assert got["kind"] in ("cpu", "cuda") and got["torch"]
    assert got["handles"] == 1  # loaded GIL-free before the import
    assert got["torch_frozen"] and got["resumed"]  # its objects frozen once at its end; full collections back


@pytest.mark.parametrize("gpu_library", [None, "libtorch_cuda.so", "libtorch_hip.so", "libtorch_xpu.so"])
def test_a_gpu_build_of_torch_is_left_to_its_own_import(tmp_path, gpu_library):
    # a CUDA build's import loads its GPU runtimes in its own order first: a dlopen of libtorch.so ahead of it
    # could bind other ones, and only CPU builds were checked (a torch stood in for: found, never imported)
    lib = tmp_path / "torch" / "lib"
    lib.mkdir(parents=True)
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('never imported here')\n")
    (lib / "libtorch.so").write_bytes(b"")
    if gpu_library:
        (lib / gpu_library).write_bytes(b"")
    got = run("import json\nfrom xllm_jupyter.backends import native_libs\n"
              "print(json.dumps(str(native_libs.torch_library())))\n", PYTHONPATH=str(tmp_path))
    assert got == ("None" if gpu_library else str(lib / "libtorch.so"))
