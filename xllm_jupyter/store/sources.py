"""What ``pull`` was asked to fetch: a packaged default, a Hub repo, or a local directory or file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Iterable

from ..core.errors import StoreError
from .manifest import MANIFEST_NAME
from .names import default_name, validate_name
from .packaged import PACKAGED

_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}", re.ASCII)
#: Ollama's ``hf.co/ORG/REPO:QUANT`` tag: one quantization of a GGUF repo (``Q4_K_M``, ``IQ3_XXS``, ``BF16``)
_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}", re.ASCII)
_HUB_PREFIXES = ("hf:", "hf.co/", "huggingface.co/", "https://huggingface.co/", "https://hf.co/")

# Files a model needs; everything else in a repo (other frameworks' weights, ONNX, docs) is skipped.
WANTED = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.gguf", "LICENSE*", "README.md")
SKIPPED_DIRS = {"onnx", "openvino", "original", "coreml", "tflite", "flax", "metal", ".cache", ".git", ".huggingface"}
SKIPPED_FILES = {MANIFEST_NAME, ".gitattributes"}


@dataclass(frozen=True)
class Source:
    """A parsed pull source; ``canonical`` is what the manifest records as ``source``."""

    kind: str  # "packaged" | "hub" | "dir" | "gguf"
    ref: str  # packaged name, repo id, or absolute path
    file: str | None = None  # hub: one file in the repo (a .gguf)
    revision: str | None = None
    quant: str | None = None  # hub: the quantization tag picking one GGUF file (upper case)

    @property
    def canonical(self) -> str:
        """The source as recorded in manifests (packaged:NAME, hf:ORG/REPO[/FILE][:QUANT], or a path)."""
        if self.kind == "packaged":
            return f"packaged:{self.ref}"
        if self.kind == "hub":
            return f"hf:{self.ref}" + (f"/{self.file}" if self.file else "") + (f":{self.quant}" if self.quant else "")
        return self.ref

    @property
    def default_name(self) -> str:
        """The name a pull of this source gets when none is given."""
        if self.kind == "packaged":
            return self.ref
        if self.kind == "hub":
            name = default_name(self.ref.split("/", 1)[1])
            return validate_name(f"{name}:{self.quant}") if self.quant else name  # as Ollama names it: repo:quant
        path = Path(self.ref)
        if self.kind == "dir" and path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
            return default_name(path.parent.parent.name.rsplit("--", 1)[-1])  # an HF cache snapshot
        return default_name(path.stem if self.kind == "gguf" else path.name)


def parse_source(source: str, revision: str | None = None) -> Source:
    """Classify ``source``: ``hf:`` prefix, packaged name, existing local path, then ``org/repo``."""
    text = source.strip()
    if not text:
        raise StoreError("Empty model source", param="source")
    for prefix in _HUB_PREFIXES:
        if text.lower().startswith(prefix):
            return _hub(text[len(prefix) :], revision)
    if revision is not None and not _REPO.fullmatch(text.split("@", 1)[0]):
        # a packaged model or a local path has no revisions: ignoring one would pull something else than asked
        raise StoreError(f"A revision applies to Hugging Face repos only, not to {text[:100]!r}", param="revision")
    if text.lower() in PACKAGED:
        return Source("packaged", text.lower())
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise StoreError("A revision applies to Hugging Face repos only, not to a local path", param="revision")
        path = path.resolve()
        if path.is_dir():
            return Source("dir", str(path))
        if path.is_file() and path.suffix.lower() == ".gguf":
            return Source("gguf", str(path))
        raise StoreError("A local source must be a model directory or a .gguf file", param="source")
    if _REPO.fullmatch(text.split("@", 1)[0]):
        return _hub(text, revision)
    if text.startswith((".", "/", "~")) or "\\" in text:
        # the path as given (never resolved): a client sees only what it sent
        raise StoreError(f"No such local model directory or .gguf file: {text[:200]}", param="source")
    raise StoreError(
        f"Unknown model source {text[:100]!r}: use a packaged name ({', '.join(PACKAGED)}), "
        "hf:ORG/REPO, or a local directory or .gguf file",
        param="source",
    )


def _hub(text: str, revision: str | None) -> Source:
    if "@" in text:
        text, rev = text.rsplit("@", 1)
        if revision and rev != revision:
            raise StoreError("Two different revisions given", param="revision")
        revision = revision or rev
    text = text.strip("/")
    text = re.sub(r"/(?:tree|blob|resolve)/[^/]+(?=/|$)", "", text)  # tolerate pasted Hub URLs
    parts = text.split("/")
    quant = None
    if len(parts) == 2 and ":" in parts[1]:  # hf.co/ORG/REPO:QUANT, as Ollama pulls one GGUF quantization
        parts[1], quant = parts[1].split(":", 1)
        if quant.lower() == "latest":  # Ollama's tag for none: as without a tag (one GGUF, else Q4_K_M)
            quant = None
        elif not _QUANT.fullmatch(quant):
            raise StoreError(f"Invalid quantization tag {quant[:40]!r} in a Hub source (e.g. :Q4_K_M)", param="source")
    repo = "/".join(parts[:2])
    if len(parts) < 2 or not _REPO.fullmatch(repo) or "--" in repo or ".." in repo:
        raise StoreError(f"Invalid Hub repo id {text[:100]!r}: expected ORG/REPO", param="source")
    file = "/".join(parts[2:]) or None
    if file is not None and (not file.lower().endswith(".gguf") or ".." in parts[2:]):
        raise StoreError("Only a single .gguf file may follow ORG/REPO in a Hub source", param="source")
    if revision is not None and (not revision or len(revision) > 200 or ".." in revision or revision.startswith("/")):
        raise StoreError("Invalid revision", param="revision")
    return Source("hub", repo, file, revision, quant.upper() if quant else None)


def _skipped(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    if any(p in SKIPPED_DIRS or p.startswith(".") for p in parts[:-1]):
        return True
    name = parts[-1]
    return name in SKIPPED_FILES or name.startswith(".") or not any(fnmatch(name, pat) for pat in WANTED)


#: how to pick one of several GGUF files: in a Hub repo, and in a local directory
PICK_HUB_GGUF = "pick one as hf:ORG/REPO/FILE.gguf, or its quantization as hf.co/ORG/REPO:Q4_K_M"
PICK_LOCAL_GGUF = "pull one of them by its path (DIR/FILE.gguf)"
#: the quantization a Hub repo of several GGUF files gives without a tag, as Ollama's ``hf.co/ORG/REPO`` pulls it
DEFAULT_QUANT = "Q4_K_M"
#: GGUF quantizations from the most bits to the fewest: where a repo lacks DEFAULT_QUANT, the next one down is pulled
#: (the Hub's rule for Ollama: the largest no bigger than Q4_K_M, else the smallest of those above it)
QUANT_ORDER = ("F32", "BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "IQ4_NL",
               "IQ4_XS", "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K",
               "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")


def select_files(paths: Iterable[str], *, only: str | None = None, pick: str = PICK_HUB_GGUF,
                 quant: str | None = None, prefer: str | None = None) -> list[str]:
    """The files of a repo/directory listing to pull: HF safetensors layout, or exactly one GGUF.

    A listing with safetensors weights keeps them and the config/tokenizer files and drops
    any GGUF; a listing with only GGUF files must hold one (or name it with ``only``, or its quantization with
    ``quant``; ``pick`` says how to choose one where it holds several). ``prefer`` (a Hub repo: DEFAULT_QUANT)
    picks one of several GGUF files without being asked, by ``default_quant``.
    """
    wanted = sorted(p for p in paths if not _skipped(p))
    if only is not None:
        if only not in wanted:
            raise StoreError(f"The file '{only}' is not in the repository", param="source")
        return [only]
    if quant is not None:
        return [_quantized(wanted, quant)]
    if any(p.endswith(".safetensors") for p in wanted):
        return [p for p in wanted if not p.endswith(".gguf")]
    ggufs = [p for p in wanted if p.endswith(".gguf")]
    models = [p for p in ggufs if not _projector(p)]  # (a vision model's mmproj file beside it is never the model)
    if len(models) == 1:
        return models
    picked = default_quant(models, prefer) if prefer else None
    if picked:
        return [picked]
    if models:
        shown = ", ".join(models[:8]) + (" ..." if len(models) > 8 else "")
        raise StoreError(f"Several GGUF files ({shown}): {pick}", param="source")
    raise StoreError("No model weights found: expected *.safetensors files or one .gguf file", param="source")


def default_quant(ggufs: list[str], prefer: str) -> str | None:
    """The GGUF file of quantization ``prefer``, else of the largest one below it in QUANT_ORDER, else of the smallest
    above it; only a quantization held in one file counts (a split model is not one file). None: no file's name
    holds a known quantization."""
    single = {}
    for quant in QUANT_ORDER:
        found = [p for p in ggufs if _tag(quant).search(PurePosixPath(p).name)]
        if len(found) == 1:
            single[quant] = found[0]
    if not single:
        return None
    rank = QUANT_ORDER.index(prefer) if prefer in QUANT_ORDER else 0
    below = [q for q in QUANT_ORDER[rank:] if q in single]
    return single[below[0]] if below else single[[q for q in QUANT_ORDER if q in single][-1]]


def _projector(path: str) -> bool:
    """True for a multimodal projector GGUF (llama.cpp's ``mmproj-*.gguf``): it sits beside a vision model's weights,
    often in the same quantizations, and is no model to serve on its own."""
    return "mmproj" in PurePosixPath(path).name.lower()


def _tag(quant: str) -> re.Pattern[str]:
    """A file name holding quantization ``quant`` (any case, not inside a longer word)."""
    # '_' may come before the tag (model_q4_k_m.gguf, as the Hub reads it), not after it: Q4_K is not Q4_K_M
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", re.IGNORECASE)


def _quantized(wanted: list[str], quant: str) -> str:
    """The one GGUF file of quantization ``quant`` (its name holds the tag, any case, not inside a longer word)."""
    tag = _tag(quant)
    ggufs = [p for p in wanted if p.endswith(".gguf") and not _projector(p)]
    found = [p for p in ggufs if tag.search(PurePosixPath(p).name)]
    if len(found) == 1:
        return found[0]
    shown = ", ".join((found or ggufs)[:8]) + (" ..." if len(found or ggufs) > 8 else "")
    if found:
        raise StoreError(f"Several GGUF files for {quant!r} ({shown}): pick one as hf:ORG/REPO/FILE.gguf", param="source")
    raise StoreError(f"No GGUF file for {quant!r} in the repository (its GGUF files: {shown or 'none'})", param="source")
