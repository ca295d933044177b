"""The layering in DESIGN.md, enforced: each layer imports only layers below it, lower layers
import no web/notebook/CLI libraries, torch stays out of light imports, and front-ends reach
servers only through client/."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "xllm_jupyter"
LOWER_LAYERS = ("core", "backends", "engine", "store", "openai")
FRONT_ENDS = ("cli", "magics", "widgets", "playground", "notebook", "client")  # client/ is how they reach servers
FORBIDDEN_LIBS = {"tornado", "jupyter_server", "traitlets", "IPython", "ipykernel", "click", "typer", "gradio",
                  "ipywidgets", "jupyterhub", "fastapi", "starlette", "uvicorn", "rich"}
# DESIGN.md's diagram, bottom up: a package may import its own rank and those below it.
RANKS = {
    "core": 0, "backends": 1, "store": 2, "engine": 3, "openai": 4, "server": 5, "extension": 6, "hub": 6,
    "client": 7, "cli": 8, "magics": 8, "widgets": 8, "playground": 8, "notebook": 8,
}
# (file, enclosing function) -> the higher-ranked packages it may import there, lazily, and why
ALLOWED_UPWARD = {
    # `xllm serve` / `xllm hub-service` start a server: the CLI is also that server's launcher
    ("cli/main.py", "serve_command"): {"server"},
    ("cli/main.py", "hub_service_command"): {"hub"},
    # the lab panel's "Open playground": Jupyter's server process hosts the Gradio front-end
    ("extension/playground.py", "_launch"): {"client", "playground"},
    # not an import: the private kernel server runs `python -m xllm_jupyter.cli.main serve` as a child
    ("client/discovery.py", "_start_local"): {"cli"},
}
# a module named in a string ("pkg.mod", or "pkg.mod:Class" as the backend registry writes it)
_MODULE_PATH = re.compile(r"xllm_jupyter(\.[A-Za-z_]\w*)+(:\w+)?")
# Our own packages that sit above the lower layers.
UPPER_PACKAGES = {"server", "extension", "hub", "cli", "magics", "widgets", "playground", "notebook", "client"}
# (file relative to the package, enclosing function) allowed to import the server layer lazily
LAZY_SERVER_IMPORTS = {("cli/main.py", "serve_command"), ("cli/main.py", "hub_service_command")}


def py_files(*subpackages: str) -> list[Path]:
    """Every .py file under the named subpackages of xllm_jupyter."""
    out: list[Path] = []
    for sub in subpackages:
        out += sorted((PKG / sub).rglob("*.py"))
    return out


def module_name(path: Path) -> str:
    """Dotted module name of a file in the package (``xllm_jupyter.engine.engine``)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(absolute module imported, enclosing function or None, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found: list[tuple[str, str | None, int]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, func, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append((target, func, child.lineno))
                # `from .. import server` names the subpackage in the alias
                found.extend((f"{target}.{alias.name}", func, child.lineno) for alias in child.names)
            elif isinstance(child, ast.Constant) and isinstance(child.value, str) and _MODULE_PATH.fullmatch(child.value):
                found.append((child.value.split(":")[0], func, child.lineno))  # importlib.import_module("...")
            visit(child, func)

    visit(tree, None)
    return found


def upward_imports(path: Path) -> list[str]:
    """Imports in ``path`` of a package ranked above its own, less those ALLOWED_UPWARD."""
    rel = path.relative_to(PKG).as_posix()
    own = RANKS[rel.split("/", 1)[0]]
    bad = []
    for name, func, line in imports(path):
        parts = name.split(".")
        if parts[0] != "xllm_jupyter" or len(parts) < 2 or parts[1] not in RANKS:
            continue
        if RANKS[parts[1]] > own and parts[1] not in ALLOWED_UPWARD.get((rel, func), ()):
            bad.append(f"line {line}: {name} (in {func or 'module scope'})")
    return bad


@pytest.mark.parametrize("path", py_files(*RANKS), ids=lambda p: str(p.relative_to(PKG)))
def test_each_layer_imports_only_its_own_rank_and_below(path):
    bad = upward_imports(path)
    assert not bad, f"{path.relative_to(PKG)} imports a higher layer: {bad}"


def test_the_rank_check_catches_a_lazy_and_a_string_import(tmp_path, monkeypatch):
    """A checker that finds nothing passes everything: feed it a core -> engine and a server -> widgets file."""
    fake = tmp_path / "xllm_jupyter"
    (fake / "core").mkdir(parents=True)
    (fake / "server").mkdir()
    (fake / "core" / "bad.py").write_text("def f():\n    from ..engine import engine\n")
    (fake / "server" / "bad.py").write_text("import importlib\nimportlib.import_module('xllm_jupyter.widgets.chat')\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    assert upward_imports(fake / "core" / "bad.py") == ["line 2: xllm_jupyter.engine (in f)",
                                                        "line 2: xllm_jupyter.engine.engine (in f)"]
    assert upward_imports(fake / "server" / "bad.py") == ["line 2: xllm_jupyter.widgets.chat (in module scope)"]


def test_every_subpackage_has_a_rank():
    packages = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert packages == set(RANKS), f"give {packages - set(RANKS)} a rank in RANKS (DESIGN.md's diagram)"


def test_the_checker_sees_real_imports():
    # Guard against a checker that silently finds nothing.
    found = {name for name, _, _ in imports(PKG / "engine" / "engine.py")}
    assert "xllm_jupyter.core.errors" in found
    found = {name for name, _, _ in imports(PKG / "cli" / "main.py")}
    assert "click" in found and "xllm_jupyter.server.standalone" in found


@pytest.mark.parametrize("path", py_files(*LOWER_LAYERS), ids=lambda p: str(p.relative_to(PKG)))
def test_lower_layers_import_no_web_notebook_or_cli_libraries(path):
    bad = []
    for name, _, line in imports(path):
        top = name.split(".")[0]
        if top in FORBIDDEN_LIBS:
            bad.append(f"line {line}: {name}")
        parts = name.split(".")
        if top == "xllm_jupyter" and len(parts) > 1 and parts[1] in UPPER_PACKAGES:
            bad.append(f"line {line}: {name} (upper layer)")
    assert not bad, f"{path.relative_to(PKG)} breaks the layering: {bad}"


@pytest.mark.parametrize("path", py_files(*FRONT_ENDS), ids=lambda p: str(p.relative_to(PKG)))
def test_front_ends_reach_servers_only_through_the_client(path):
    rel = path.relative_to(PKG).as_posix()
    bad = []
    for name, func, line in imports(path):
        parts = name.split(".")
        if parts[0] == "xllm_jupyter" and len(parts) > 1 and parts[1] in {"server", "extension", "hub"}:
            if (rel, func) not in LAZY_SERVER_IMPORTS:
                bad.append(f"line {line}: {name} (in {func or 'module scope'})")
    assert not bad, f"{rel} imports the server layer: {bad}"


def light_modules() -> list[str]:
    """Modules that must import without torch: the package, core, engine, openai, store, server and the front-ends."""
    names = ["xllm_jupyter", "xllm_jupyter.engine.engine", "xllm_jupyter.client", "xllm_jupyter.cli.main", "xllm_jupyter.magics"]
    for path in py_files("core", "engine", "openai", "store", "server"):
        names.append(module_name(path))
    return sorted(set(names))


def test_light_imports_do_not_import_torch():
    modules = light_modules()
    assert "xllm_jupyter.engine.engine" in modules
    code = (
        "import importlib, json, sys\n"
        f"mods = {modules!r}\n"
        "leaks = {}\n"
        "for m in mods:\n"
        "    importlib.import_module(m)\n"
        "    if 'torch' in sys.modules and not leaks:\n"
        "        leaks['first'] = m\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'first': leaks.get('first'),\n"
        "                  'transformers': 'transformers' in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PKG.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["torch"], f"importing {report['first']} imported torch"
    assert not report["transformers"], "a light import pulled in transformers"


def test_openai_serving_imports_without_torch_when_present():
    if not (PKG / "openai" / "serving.py").is_file():
        pytest.skip("openai/serving.py not written yet")
    code = "import sys, xllm_jupyter.openai.serving; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PKG.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def private_engine_reads(path: Path) -> list[str]:
    """``engine._x`` or ``getattr(engine, "_x")`` in ``path``: state the engine's thread may be changing."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and str(node.args[1].value).startswith("_")):
            owner = ast.unparse(node.args[0])
        else:
            continue
        if owner.split(".")[-1] in ("engine", "_engine"):
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    return bad


@pytest.mark.parametrize("path", py_files("server", "openai", "extension", "hub"), ids=lambda p: str(p.relative_to(PKG)))
def test_the_layers_above_use_only_the_engines_public_api(path):
    bad = private_engine_reads(path)
    assert not bad, f"{path.relative_to(PKG)} reads the engine's private state: {bad}"


def test_the_private_read_check_sees_both_spellings(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f(self, engine):\n    a = self.xllm.engine._runners\n    return getattr(engine, '_started', True)\n")
    assert private_engine_reads(sample) == ["line 2: self.xllm.engine._runners", "line 3: getattr(engine, '_started', True)"]
