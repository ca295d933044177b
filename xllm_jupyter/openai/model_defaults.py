"""A created model's Modelfile defaults, applied to OpenAI requests that leave them unset.

The engine hands these over as a ``ModelfileDefaults`` (``engine.model_defaults(name)``:
``parameters`` under Ollama's names, ``system``, ``messages``), so this layer never
imports the store. A value the request sets always wins.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..core.types import ChatMessage, ModelfileDefaults

#: Ollama parameter name -> request field it defaults
_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repetition_penalty",
    "stop": "stop",
}


class ModelDefaults:
    """Modelfile defaults for one model (empty for models made by ``pull``)."""

    def __init__(self, data: ModelfileDefaults | None):
        data = data or ModelfileDefaults()
        self.parameters = data.parameters
        self.system = data.system
        self.messages = data.messages

    @classmethod
    def of(cls, engine: Any, model: str) -> "ModelDefaults":
        """The defaults of loaded model ``model`` (engines without defaults give none)."""
        getter = getattr(engine, "model_defaults", None)
        return cls(getter(model) if getter is not None else None)

    def apply(self, req: Any) -> Any:
        """A copy of pydantic request ``req`` with unset sampling fields filled from the Modelfile."""
        update = self._updates(lambda attr: hasattr(req, attr) and getattr(req, attr) is None)
        return req.model_copy(update=update) if update else req

    def fill(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword parameters (as the in-process client takes them) with unset sampling fields filled the same way."""
        return {**params, **self._updates(lambda attr: params.get(attr) is None)}

    def _updates(self, unset: Callable[[str], bool]) -> dict[str, Any]:
        """The Modelfile's value for every sampling field ``unset`` says the request leaves open."""
        update = {}
        for key, attr in _FIELDS.items():
            value = self.parameters.get(key)
            if value is not None and unset(attr):
                update[attr] = list(value) if key == "stop" else value
        return update

    def request_fields(self) -> dict[str, Any]:
        """What a request leaving every sampling field and max_tokens unset gets, under the request's own names."""
        fields = self._updates(lambda attr: True)
        n = self.max_tokens(None)
        return {**fields, "max_tokens": n} if n is not None else fields

    def max_tokens(self, fallback: int | None) -> int | None:
        """The completion budget when the request sets none: ``num_predict`` (> 0), else ``fallback``."""
        n = self.parameters.get("num_predict")
        return n if isinstance(n, int) and n > 0 else fallback

    def chat_messages(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        """SYSTEM first unless the request has its own system message, then MESSAGE few-shot turns."""
        if self.system is None and not self.messages:
            return messages
        lead = 0
        while lead < len(messages) and messages[lead].role in ("system", "developer"):
            lead += 1
        system = messages[:lead] or ([ChatMessage(role="system", content=self.system)] if self.system else [])
        return [*system, *self.messages, *messages[lead:]]
