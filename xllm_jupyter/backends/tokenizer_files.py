"""Reading a model's transformers tokenizer from its directory, and a digest of the files it was read from.

Two jobs, both about a load's GIL-holding stretches (docs/performance.md, "A model load and the IOLoop"):

- ``load_tokenizer`` skips transformers' second read of ``tokenizer.json`` where it adds nothing. A
  tokenizer saved by transformers 5 (the packaged SmolLM2, anything ``save_pretrained`` wrote) has no
  ``added_tokens_decoder`` in its ``tokenizer_config.json``, and transformers then parses the whole
  ``tokenizer.json`` with Python's json (0.1-0.4 s for SmolLM2's 3.5 MB, the GIL held throughout) only
  to take its ``added_tokens``, which the Rust tokenizer it builds from the same file has anyway.
- ``loaded_digest`` is the digest of the tokenizer files a tokenizer was read from, taken before and
  after the read: a re-pull that replaced the files meanwhile makes them differ, and the tokenizer then
  has no digest (its grammar tokenizer is not shared: constraints.SharedTokenizers).
- A load whose tokenizer files are byte for byte those of a tokenizer still in use (engine replicas,
  ``xllm cp``/``create`` copies, fine-tunes that kept their base's tokenizer) gets that tokenizer itself:
  its ``Tokenizer.from_file`` (Rust, 0.12-0.29 s for SmolLM2's, the GIL held throughout: the worst
  stretch of a warm load) is not run again. Sharing is safe because a loaded tokenizer is only read
  once settled (hf_tokenizer.py: ``settle``): nothing in a model changes its tokenizer.
- ``release`` keeps an unloaded model's tokenizer a while (released_tokenizers.py), so the model's reload
  gets it back as a copy's load does. A tokenizer whose state differs from what its load left (``state``:
  its chat template, special and added tokens, limits; only a test has ever changed one) is never handed out.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from pathlib import Path
from typing import Any

from ..core import gc_freeze
from . import released_tokenizers

#: the files a transformers tokenizer is read from in its directory (and added tokens from): their bytes identify it
#: (the chat templates too: transformers reads chat_template.jinja and additional_chat_templates/ into the tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja")
#: the directory of a tokenizer's other named chat templates (``NAME.jinja``)
TEMPLATE_DIR = "additional_chat_templates"
#: the classes that build their Rust tokenizer straight from ``tokenizer.json`` (added tokens included)
FILE_BUILT_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")

#: ``loaded_digest`` of a tokenizer ``load_tokenizer`` did not read from tokenizer files
NOT_READ = object()
# what load_tokenizer found: tokenizer -> the digest of its files (None: they changed during the read)
_digests: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()
_digests_lock = threading.Lock()
# (digest, the load's arguments) -> a tokenizer read from such files, while some model (or RELEASED) still holds it
_in_use: weakref.WeakValueDictionary[tuple[str, str], Any] = weakref.WeakValueDictionary()
# a tokenizer in _in_use -> (its key there, ``state`` as its load left it)
_loaded_as: weakref.WeakKeyDictionary[Any, tuple[tuple[str, str], str | None]] = weakref.WeakKeyDictionary()


def files_digest(directory: str | Path) -> str | None:
    """sha256 over the tokenizer files in ``directory`` (names, sizes, bytes); None without a ``tokenizer.json``.

    2.5 ms for SmolLM2's 3.5 MB ``tokenizer.json``, read and hashed in 1 MiB chunks (both release the GIL).
    """
    try:
        source = Path(directory)
        names = set(os.listdir(source))
        if TOKENIZER_FILES[0] not in names:
            return None
        digest = hashlib.sha256()
        more = sorted(f"{TEMPLATE_DIR}/{n}" for n in os.listdir(source / TEMPLATE_DIR)) if TEMPLATE_DIR in names else []
        if "config.json" in names and not names_its_class(source):
            more.append("config.json")  # transformers picks the tokenizer's class from the model's config then
        for name in (*TOKENIZER_FILES, *more):
            if name not in names and name not in more:
                continue
            with open(source / name, "rb") as f:
                digest.update(f"{name} {os.fstat(f.fileno()).st_size}\n".encode())
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None


def names_its_class(directory: Path) -> bool:
    """True when ``tokenizer_config.json`` names the tokenizer's class (else the model's ``config.json`` decides it)."""
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("tokenizer_class"))


def added_tokens_only_in_tokenizer_json(directory: str | Path) -> bool:
    """Whether transformers would parse ``tokenizer.json`` in Python just for added tokens its Rust build has anyway.

    True only in the one case checked to give the same tokenizer (tests/test_tokenizer_files.py): a
    ``tokenizer.json``, a ``tokenizer_config.json`` naming a class built straight from it and no
    ``added_tokens_decoder``, and none of the legacy files (``special_tokens_map.json``,
    ``added_tokens.json``) that transformers reads in the same branch.
    """
    source = Path(directory)
    try:
        names = set(os.listdir(source))
        if TOKENIZER_FILES[0] not in names or "tokenizer_config.json" not in names:
            return False
        if names & {"special_tokens_map.json", "added_tokens.json"}:
            return False
        config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and config.get("tokenizer_class") in FILE_BUILT_CLASSES
            and "added_tokens_decoder" not in config)


def load_tokenizer(directory: str | Path, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(directory, **kwargs)``, without the Python re-parse of ``tokenizer.json``
    where it adds nothing; the digest of the files read is kept for ``loaded_digest``."""
    from transformers import AutoTokenizer

    if kwargs.get("gguf_file"):  # read from the GGUF's metadata: no tokenizer files to digest
        # (its million field objects set off full collections: 0.06-1.3 s each; garbage, nothing to freeze)
        with gc_freeze.one_collection(freeze_after=False):
            return AutoTokenizer.from_pretrained(str(directory), **kwargs)
    before = files_digest(directory)
    key = (before, repr(sorted(kwargs.items()))) if before is not None else None
    if key is not None:
        with _digests_lock:
            shared = _in_use.get(key)
        released_tokenizers.RELEASED.take(key)  # (in use again, if it was released: no longer kept for a reload)
        if shared is not None and unchanged(shared):
            return shared  # the same files, read already: no second Tokenizer.from_file (its GIL stretch)
    if "added_tokens_decoder" not in kwargs and added_tokens_only_in_tokenizer_json(directory):
        # present (empty): transformers skips its legacy branch, the json.load of the whole tokenizer.json
        kwargs["added_tokens_decoder"] = {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except Exception as exc:
        if type(exc) is not Exception:
            raise
        # the Rust tokenizers library refuses a file it cannot parse with a bare Exception, which the backends'
        # load errors (OSError, ValueError, ...) would not catch: a damaged tokenizer.json was a 500, not a load error
        raise ValueError(f"the tokenizer files could not be read ({exc})") from exc
    after = files_digest(directory)
    if before is not None or after is not None:
        try:
            with _digests_lock:
                _digests[tokenizer] = before if before == after else None
                if key is not None and before == after:
                    _in_use[key] = tokenizer
                    _loaded_as[tokenizer] = (key, state(tokenizer))
        except TypeError:  # not weakly referable or hashable: identified later by its files, as any other
            pass
    return tokenizer


def loaded_digest(tokenizer: Any) -> Any:
    """The digest of the files ``load_tokenizer`` read ``tokenizer`` from; None if they changed during the read
    (a re-pull: which bytes it read is not known); ``NOT_READ`` if it was not read from tokenizer files there."""
    try:
        with _digests_lock:
            return _digests.get(tokenizer, NOT_READ)
    except TypeError:
        return NOT_READ


def state(tokenizer: Any) -> str | None:
    """A digest of what a model's use could change in ``tokenizer`` (None: unreadable, so never shared).

    Its class, length, chat templates, special and added tokens and the settings transformers' calls read;
    not the truncation and padding of its Rust tokenizer, which ``hf_tokenizer.settle`` switches off for
    every model alike. 0.02 ms for SmolLM2's: it runs at every load of shared files and every release.
    """
    try:
        added = sorted((i, str(t)) for i, t in tokenizer.added_tokens_decoder.items())
        parts = (type(tokenizer).__qualname__, len(tokenizer), tokenizer.chat_template, tokenizer.special_tokens_map,
                 added, tokenizer.model_max_length, tokenizer.padding_side, tokenizer.truncation_side,
                 getattr(tokenizer, "split_special_tokens", None), tokenizer.clean_up_tokenization_spaces,
                 getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None))
        return hashlib.sha256(repr(parts).encode()).hexdigest()
    except Exception:  # not a transformers tokenizer: nothing known to compare
        return None


def unchanged(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` (read by ``load_tokenizer`` and shared) is still as its load left it."""
    try:
        with _digests_lock:
            loaded = _loaded_as.get(tokenizer)
    except TypeError:
        return False
    return loaded is not None and loaded[1] is not None and state(tokenizer) == loaded[1]


def release(tokenizer: Any) -> bool:
    """An unloading model is done with ``tokenizer``: keep it for a reload of the same files (released_tokenizers.py)
    if ``load_tokenizer`` shared it and it is unchanged; True when kept."""
    try:
        with _digests_lock:
            loaded = _loaded_as.get(tokenizer)
    except TypeError:
        return False
    if loaded is None or not unchanged(tokenizer):
        return False  # (a changed one goes with its last user; a load of its files reads them afresh)
    released_tokenizers.RELEASED.keep(loaded[0], tokenizer)
    return True
