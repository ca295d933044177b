"""``{var}`` interpolation of a cell body from the notebook's variables; unknown names stay as written."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any


class _Missing:
    """Stands in for an unknown ``{name}`` and formats back to the original text."""

    def __init__(self, key: str):
        self.key = key

    def __format__(self, spec: str) -> str:
        return "{" + self.key + (":" + spec if spec else "") + "}"

    def __str__(self) -> str:
        return "{" + self.key + "}"

    __repr__ = __str__

    def __getattr__(self, attr: str) -> _Missing:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.key}.{attr}")

    def __getitem__(self, item: Any) -> _Missing:
        return _Missing(f"{self.key}[{item}]")


class _KeepUnknown(dict):
    """A namespace view whose missing keys format back to ``{key}``."""

    def __missing__(self, key: str) -> _Missing:
        return _Missing(key)


class Filler(string.Formatter):
    """Fills the ``{name}`` of one cell's texts, each field looked up once (a property with side effects runs once,
    though a line is read as a command before it is asked as a prompt)."""

    def __init__(self, namespace: Mapping[str, Any]):
        super().__init__()
        self.namespace = _KeepUnknown(namespace)
        self._found: dict[str, tuple[Any, Any]] = {}

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, Any]:
        """``field_name``'s object (``a``, ``a.b``, ``a[0]``), from the first lookup of it by this filler."""
        if field_name not in self._found:
            self._found[field_name] = super().get_field(field_name, args, kwargs)
        return self._found[field_name]

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        """``!r``/``!s``/``!a`` of a found value; an unknown name keeps its conversion as written (``{value!r}``)."""
        if isinstance(value, _Missing) and conversion:
            return _Missing(f"{value.key}!{conversion}")
        return super().convert_field(value, conversion)

    def __call__(self, text: str) -> str:
        """``text`` with ``{var}`` filled (``{{``/``}}``: a literal brace); unknown names and text that is not a
        template stay as-is."""
        if "{" not in text and "}" not in text:  # `}}` alone is a template too: one brace, as beside a `{name}`
            return text
        try:
            return self.vformat(text, (), self.namespace)
        except Exception:
            # Unbalanced braces, "{}" or "{0}", a bad attribute, a property that raises: the text is not meant as a
            # template (e.g. code) or cannot be filled, so send it untouched rather than fail the cell (as IPython's
            # own expansion of a magic's line did)
            return text


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    """Fill ``{var}`` from ``namespace`` (``{{``/``}}``: a literal brace); unknown names and text that is not a template stay as-is."""
    return Filler(namespace)(text)
