"""The manifest every stored model carries: what it is, where it came from, and its files' hashes.

It lives in the model directory as ``xllm-manifest.json`` and is written last: a
directory without a valid manifest is not a model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from ..core.errors import StoreError
from .atomic import atomic_write_text
from .names import safe_relpath, validate_name
from .progress import ProgressFn, PullProgress

MANIFEST_NAME = "xllm-manifest.json"
#: how the ``source`` of a model made by ``xllm create`` (or ``cp``) reads: made from a stored model, not pulled
CREATED_PREFIX = "modelfile:"
SCHEMA_VERSION = 1
FORMATS = ("safetensors", "gguf", "exl3", "exl2", "gptq", "lora")
TASKS = ("chat", "embedding", "adapter")
CHUNK = 1 << 20


@dataclass(frozen=True)
class ManifestFile:
    """One file of a model: its path relative to the model directory, sha256 and size."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """A stored model's description; ``path`` is its directory (not serialised)."""

    name: str
    source: str
    format: str
    files: tuple[ManifestFile, ...]
    size: int
    created: int
    template: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None
    digest: str = ""
    revision: str | None = None
    path: Path | None = field(default=None, compare=False)
    task: str = "chat"  # "chat" or "embedding"; absent in older manifests, which are chat
    #: the settings of a model made by ``create`` from a Modelfile (``Modelfile.to_dict``)
    modelfile: dict[str, Any] | None = None

    @property
    def weights_path(self) -> Path:
        """What a backend loads: the GGUF file for ``gguf`` models, else the model directory."""
        if self.path is None:
            raise StoreError(f"Model '{self.name}' has no directory")
        if self.format == "gguf":
            ggufs = [f.path for f in self.files if f.path.endswith(".gguf")]
            if len(ggufs) != 1:
                raise StoreError(f"Model '{self.name}' should hold exactly one .gguf file")
            return self.path / ggufs[0]
        return self.path

    def to_json(self) -> str:
        """The manifest as JSON text (``path`` left out)."""
        data = {
            "schema": SCHEMA_VERSION,
            "name": self.name,
            "source": self.source,
            "revision": self.revision,
            "format": self.format,
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files],
            "size": self.size,
            "created": self.created,
            "template": self.template,
            "parameters": self.parameters,
            "backend": self.backend,
            "digest": self.digest,
            "task": self.task,
        }
        if self.modelfile is not None:  # only then: manifests of pulled models stay as before
            data["modelfile"] = self.modelfile
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Path | None = None) -> "Manifest":
        """Parse and validate manifest JSON; StoreError when it is malformed or unsafe."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
                raise ValueError("schema")
            files = tuple(
                ManifestFile(path=safe_relpath(str(f["path"])), sha256=_hex(f["sha256"]), size=_nonneg(f["size"]))
                for f in data["files"]
            )
            params = data.get("parameters") or {}
            if not isinstance(params, dict):
                raise ValueError("parameters")
            template = data.get("template")
            manifest = cls(
                name=validate_name(data["name"]),
                source=str(data["source"]),
                format=str(data["format"]),
                files=files,
                size=_nonneg(data["size"]),
                created=int(data["created"]),
                template=template if isinstance(template, str) else None,
                parameters=params,
                backend=data.get("backend") if isinstance(data.get("backend"), str) else None,
                digest=str(data["digest"]),
                revision=data.get("revision") if isinstance(data.get("revision"), str) else None,
                path=path,
                task=data.get("task") if data.get("task") in TASKS else "chat",
                modelfile=data["modelfile"] if isinstance(data.get("modelfile"), dict) else None,
            )
        except StoreError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"Damaged model manifest ({exc.__class__.__name__})") from None
        if any(f.path == MANIFEST_NAME for f in files) or len({f.path for f in files}) != len(files):
            raise StoreError("Damaged model manifest (file list)")
        return manifest

    def with_path(self, path: Path) -> "Manifest":
        """The same manifest pointing at directory ``path``."""
        return replace(self, path=path)


def _hex(value: object) -> str:
    text = str(value).lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError("sha256")
    return text


def _nonneg(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("size")
    return value


def compute_digest(files: Iterable[ManifestFile]) -> str:
    """``sha256:`` + sha256 over ``"<sha256> <path>\\n"`` lines of the files sorted by path."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.sha256} {f.path}\n".encode())
    return "sha256:" + h.hexdigest()


def hash_file(path: Path, *, progress: ProgressFn | None = None, label: str | None = None, stage: str = "verify") -> tuple[str, str, int]:
    """(sha256, git blob sha1, size) of a file, read once in chunks, reporting progress."""
    size = path.stat().st_size
    sha = hashlib.sha256()
    git = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            git.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(PullProgress(stage, label, done, size))
    if done != size:
        raise StoreError(f"File {label or path.name} changed while it was read")
    return sha.hexdigest(), git.hexdigest(), size


def created_from(source: str | None) -> str | None:
    """The stored model a model made by ``xllm create``/``cp`` was made from (from its ``source``); None if pulled."""
    return source[len(CREATED_PREFIX):] if source and source.startswith(CREATED_PREFIX) else None


def recorded_source(model_dir: Path) -> str | None:
    """The ``source`` a manifest too damaged to read whole still records (None when it cannot be read)."""
    try:
        source = json.loads((model_dir / MANIFEST_NAME).read_text(encoding="utf-8")).get("source")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return source if isinstance(source, str) else None


def read_manifest(model_dir: Path) -> Manifest:
    """The manifest of the model in ``model_dir``; StoreError when it is missing or damaged."""
    path = model_dir / MANIFEST_NAME
    if path.is_symlink() or not path.is_file():
        raise StoreError("Model manifest is missing")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise StoreError("Model manifest is unreadable") from None
    return Manifest.from_json(text, path=model_dir)


def write_manifest(model_dir: Path, manifest: Manifest) -> None:
    """Write the manifest atomically into ``model_dir`` (the last file of a pull)."""
    atomic_write_text(model_dir / MANIFEST_NAME, manifest.to_json())


def detect_format(model_dir: Path) -> str:
    """safetensors, gguf, exl3, exl2 or gptq, judged from the files and ``config.json``."""
    names = [p.name for p in model_dir.rglob("*") if p.is_file()]
    has_st = any(n.endswith(".safetensors") for n in names)
    if has_st and is_adapter_dir(model_dir):
        return "lora"
    if not has_st:
        if sum(n.endswith(".gguf") for n in names) == 1:
            return "gguf"
        raise StoreError("No model weights found: expected *.safetensors files or one .gguf file")
    config = model_dir / "config.json"
    if not config.is_file():
        raise StoreError("The model has *.safetensors but no config.json")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise StoreError("The model's config.json is not valid JSON") from None
    quant = data.get("quantization_config") if isinstance(data, dict) else None
    method = str(quant.get("quant_method", "")).lower() if isinstance(quant, dict) else ""
    return method if method in ("exl3", "exl2", "gptq") else "safetensors"


def read_template(model_dir: Path) -> str | None:
    """The chat template in an HF model directory (chat_template.jinja/.json or tokenizer_config.json)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name, key in (("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # named templates: prefer "default"
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            chosen = named.get("default") or next(iter(named.values()), None)
            if isinstance(chosen, str):
                return chosen
    return None


def detect_task(model_dir: Path) -> str:
    """``embedding`` for a sentence-transformers layout (modules.json or 1_Pooling/), ``adapter`` for a peft LoRA, else ``chat``."""
    if is_adapter_dir(model_dir):
        return "adapter"
    if (model_dir / "modules.json").is_file() or (model_dir / "1_Pooling" / "config.json").is_file():
        return "embedding"
    return "chat"


def is_adapter_dir(model_dir: Path) -> bool:
    """True for a peft adapter directory: adapter_config.json and no model config.json."""
    return (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file()


def adapter_parameters(model_dir: Path) -> dict[str, Any]:
    """A pulled model's manifest ``parameters``: for a peft adapter, the ``base_model`` its config names."""
    if not is_adapter_dir(model_dir):
        return {}
    try:
        value = json.loads((model_dir / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        value = None
    return {"base_model": value if isinstance(value, str) and value else None}


def with_adapter_base(manifest: Manifest, base: str) -> Manifest:
    """Adapter ``manifest`` recording stored model ``base`` as its base (nothing written); StoreError (param
    ``base``) for a model that is no LoRA adapter."""
    base = validate_name(base)
    if manifest.parameters.get("base_model") == base:
        return manifest
    if manifest.task != "adapter":
        raise StoreError(f"'{manifest.name}' is not a LoRA adapter, so it takes no base model", param="base")
    return replace(manifest, parameters={**manifest.parameters, "base_model": base})


def set_adapter_base(manifest: Manifest, base: str) -> Manifest:
    """Adapter ``manifest`` recording stored model ``base`` as its base (rewritten in its directory)."""
    updated = with_adapter_base(manifest, base)
    if updated is not manifest:
        if manifest.path is None:
            raise StoreError(f"'{manifest.name}' is not a LoRA adapter, so it takes no base model", param="base")
        write_manifest(manifest.path, updated)
    return updated


def lora_fields(manifest: Manifest) -> dict[str, Any]:
    """``ModelSpec`` fields for LoRA: an adapter's ``base_model``; a created model's ADAPTER to merge at load."""
    if manifest.task == "adapter":
        return {"base_model": manifest.parameters.get("base_model")}
    merged = manifest.parameters.get("adapter")  # set by ``create`` for a Modelfile ADAPTER
    if isinstance(merged, str) and manifest.path is not None:
        return {"overrides": {"merge_adapter": str(manifest.path / safe_relpath(merged))}}
    return {}
