"""The reference tables of docs/ against the code: every setting, its variable and default; every metric and its type."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import click
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.server_fixtures import TINY
from xllm_jupyter.core.config import XllmConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# a row of a key table: | `key` | `XLLM_...` (alias ...) | default | meaning |
_KEY_ROW = re.compile(r"^\| `(\w+)` \| `(XLLM_\w+)`[^|]*\| ([^|]*) \|", re.M)
# defaults the table words rather than writes as a value
_WORDED = {("store", "home"), ("http", "allowed_hosts")}


def _documented_keys() -> dict[tuple[str, str], tuple[str, str]]:
    """``{(section, key): (env variable, default cell)}`` from docs/configuration.md's tables."""
    out = {}
    for part in re.split(r"^### ", (DOCS / "configuration.md").read_text(), flags=re.M)[1:]:
        section = re.match(r"`(\w+)`", part)
        if section is None:
            continue
        body = part.split("\n## ", 1)[0]
        for key, env, default in _KEY_ROW.findall(body):
            out[(section.group(1), key)] = (env, default.strip())
    return out


def _as_written(cell: str):
    """A default cell's value: `none` is empty, else the first backticked value read as YAML."""
    if cell.startswith("none"):
        return None
    value = yaml.safe_load(re.match(r"`([^`]*)`", cell).group(1))
    return "" if value is None else value


def test_configuration_md_names_every_key_its_variable_and_default():
    documented = _documented_keys()
    config = XllmConfig()
    fields = {(f.name, k.name) for f in dataclasses.fields(config) for k in dataclasses.fields(getattr(config, f.name))}
    assert fields - documented.keys() == set(), "keys docs/configuration.md has no row for"
    assert documented.keys() - fields == set(), "rows of docs/configuration.md naming no key"
    for (section, key), (env, cell) in documented.items():
        assert env == f"XLLM_{section.upper()}_{key.upper()}", (section, key)
        if (section, key) in _WORDED:
            continue
        code = getattr(getattr(config, section), key)
        written = _as_written(cell)
        if written is None or written == []:
            assert code in ((), ""), f"{section}.{key}: the docs say none, the code has {code!r}"
        else:
            assert type(code)(written) == code, f"{section}.{key}: the docs say {cell}, the code has {code!r}"


def test_metrics_md_lists_what_metrics_serves(raw):
    """Every metric of docs/metrics.md's table is served under that name and type, and every one served is in it."""
    rows = re.findall(r"^\| `(xllm_\w+)` \| (\w+) \|", (DOCS / "metrics.md").read_text(), re.M)
    assert len(rows) > 20
    # a generation first, so the labelled families have samples too
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    assert r.status_code == 200
    r = raw.get("/metrics")
    assert r.status_code == 200
    served = {f.name: f.type for f in text_string_to_metric_families(r.text)
              if f.name.startswith("xllm_") and not f.name.endswith("_created")}
    # the parser names a counter without its _total, as the exposition's samples carry it
    documented = {name.removesuffix("_total") if kind == "counter" else name: kind for name, kind in rows}
    assert served == documented


def test_readme_command_list_matches_the_cli():
    """The README's `xllm` command block names every command and each one's options, and no option the CLI lacks."""
    from xllm_jupyter.cli.main import main

    block = re.search(r"## The `xllm` command\n\n```text\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    listed = {}
    for line in block.splitlines():
        name, usage = re.match(r"xllm ([a-z-]+) ?(.*)", line).groups()
        listed[name] = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", usage.split("  ")[0]))
    assert listed.keys() == main.commands.keys()
    client_flags = {"--url", "--api-key", "--help", "-h"}  # the README's prose covers these for every client command
    for name, command in main.commands.items():
        options = [p.opts + p.secondary_opts for p in command.params if isinstance(p, click.Option)]
        assert listed[name] - {o for opts in options for o in opts} == set(), f"xllm {name} has no such option"
        missing = {opts[0] for opts in options if not client_flags & set(opts) and not listed[name] & set(opts)}
        assert missing == set(), f"the README's line for xllm {name} leaves these out"


def test_yaml_examples_in_the_docs_are_valid_config(tmp_path):
    """Every ```yaml block of README.md and docs/ loads as a config.yaml (no misspelt key or bad value)."""
    blocks = [(path.name, m) for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
              for m in re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)]
    assert len(blocks) >= 4
    for i, (name, text) in enumerate(blocks):
        path = tmp_path / f"{i}.yaml"
        path.write_text(text)
        try:
            load_config(path, env={})
        except Exception as exc:
            raise AssertionError(f"a yaml example of {name} does not load: {exc}\n{text}") from exc


def test_every_variable_the_code_reads_is_in_configuration_md():
    """An XLLM_ variable named in the package's code (beside the XLLM_<SECTION>_<KEY> rows above) has a row in
    docs/configuration.md's table of environment variables."""
    named = {m for path in (ROOT / "xllm_jupyter").rglob("*.py")
             for m in re.findall(r"[\"'](XLLM_[A-Z_]+)[\"']", path.read_text())}
    assert {"XLLM_HOME", "XLLM_BASE_URL", "XLLM_API_KEY"} <= named
    table = (DOCS / "configuration.md").read_text().split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `(XLLM_[A-Z_]+)` \|", table, re.M))
    keys = {var for var, _ in _documented_keys().values()}
    assert named - rows - keys == set()


def test_source_files_the_docs_name_exist():
    """Scripts, tests and modules README.md and docs/ point to (`benchmarks/soak.py`, `engine/runner.py`) exist."""
    layers = "backends|engine|server|openai|store|client|core|notebook|widgets|playground|magics|cli|hub|extension"
    named = set()
    for path in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = path.read_text()
        named |= set(re.findall(r"(?<![\w/])((?:benchmarks|tests|xllm_jupyter)/[\w/.-]+\.(?:py|sh|txt))", text))
        named |= {f"xllm_jupyter/{m}" for m in re.findall(rf"`((?:{layers})/\w+\.py)", text)}
    assert len(named) > 50
    assert sorted(p for p in named if not (ROOT / p).exists()) == []
