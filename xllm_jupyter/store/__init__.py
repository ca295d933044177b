"""The model store on disk: pull (packaged defaults, Hugging Face Hub, local paths), manifests, verify."""

from __future__ import annotations

from .manifest import Manifest, ManifestFile
from .names import validate_name
from .packaged import PACKAGED, PackagedModel
from .progress import PullProgress
from .store import ModelStore

__all__ = ["ModelStore", "Manifest", "ManifestFile", "PullProgress", "PACKAGED", "PackagedModel", "validate_name"]
