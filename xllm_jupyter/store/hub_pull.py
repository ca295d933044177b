"""Pulling from the Hugging Face Hub: resolve the commit, download and verify the files, convert a GGUF if asked.

The download goes into ``tmp/hub-<key>`` (the endpoint, repository, commit and files chosen make the key), which
a failed pull keeps so that its retry resumes it; ``PullMixin._finish`` (pulling.py) moves the model into place.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, ContextManager

from .atomic import remove_tree
from .hub import HubClient, verify_files
from .manifest import Manifest, ManifestFile, detect_format, read_template
from .progress import ProgressFn
from .sources import DEFAULT_QUANT, Source, select_files


class HubPullMixin:
    """ModelStore's pull of a Hub source; the pipeline (pulling.py) gives it the work directories and the install."""

    endpoint: str | None
    token: str | bool | None
    _workdir: Callable[..., ContextManager[Path]]
    _finish: Callable[..., Manifest]
    _hash_tree: Callable[[Path, ProgressFn | None], list[ManifestFile]]

    def _pull_hub(self, src: Source, n: str, existing: Manifest | None, report: ProgressFn | None, force: bool, convert: bool,
                  base: str | None = None) -> Manifest:
        """Model ``n`` at ``src``'s commit (the stored one when it is that commit and no ``force``), downloaded into a
        work directory a failed pull keeps, verified, and converted when it is a GGUF and ``convert`` is set."""
        client = HubClient(self.endpoint, self.token)
        commit = client.resolve(src.ref, src.revision)
        if existing is not None and not force and existing.revision == commit:
            return existing
        listing = {f.path: f for f in client.list_files(src.ref, commit)}
        # several GGUF files and no tag: Q4_K_M (or the nearest below it), as Ollama pulls hf.co/ORG/REPO
        chosen = [listing[p] for p in select_files(listing, only=src.file, quant=src.quant, prefer=DEFAULT_QUANT)]
        key = hashlib.sha256("\n".join([client.endpoint, src.ref, commit, *(f.path for f in chosen)]).encode()).hexdigest()
        with self._workdir(f"hub-{key[:24]}", keep_on_error=True) as staging:
            client.download(src.ref, commit, chosen, staging, report)
            files = verify_files(staging, chosen, report)
            remove_tree(staging / ".cache")
            fmt = detect_format(staging)
            if fmt != "gguf":
                return self._finish(staging, n, src, fmt, files, read_template(staging), commit, report, base)
            from .convert import gguf_chat_template, gguf_to_safetensors

            gguf = staging / files[0].path
            if not convert:
                return self._finish(staging, n, src, fmt, files, gguf_chat_template(gguf), commit, report, base)
            with self._workdir("pull") as build:
                template = gguf_to_safetensors(gguf, build, progress=report)
                manifest = self._finish(build, n, src, detect_format(build), self._hash_tree(build, report), template, commit,
                                        report, base)
            remove_tree(staging)
            return manifest
