"""The layering in DESIGN.md, enforced: lower layers import no web/notebook/CLI libraries,
torch stays out of light imports, and front-ends reach servers only through client/."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "xllm_jupyter"
LOWER_LAYERS = ("core", "backends", "engine", "store", "openai")
FRONT_ENDS = ("cli", "magics", "widgets", "playground", "notebook", "client")  # client/ is how they reach servers
FORBIDDEN_LIBS = {"tornado", "jupyter_server", "traitlets", "IPython", "ipykernel", "click", "typer", "gradio"}
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
            visit(child, func)

    visit(tree, None)
    return found


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
    """Modules that must import without torch: the package, core, engine, openai and the front-ends."""
    names = ["xllm_jupyter", "xllm_jupyter.engine.engine", "xllm_jupyter.client", "xllm_jupyter.cli.main", "xllm_jupyter.magics"]
    for path in py_files("core", "engine", "openai"):
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
