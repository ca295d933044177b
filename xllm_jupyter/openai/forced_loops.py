"""Ends a grammar-forced tool reply's choices once they start repeating their own calls."""

from __future__ import annotations

from typing import Any, Sequence

from ..core.types import ChoiceDelta, GenerationRequest, Usage
from .tool_calling import ToolCalling


class ForcedLoops:
    """Ends the choices of a grammar-forced tool reply that start repeating their own calls.

    A small model forced to call tools tends to write the same call until its budget runs out
    (finish ``length``, which the SDK's ``parse()`` rejects). The tool parser drops the repeat;
    here its choice ends at it, and once every choice has ended the request stops (closing the
    engine's stream cancels what is left). Usage then counts the tokens received so far.
    """

    def __init__(self, gen: GenerationRequest, tools: ToolCalling, streamers: Sequence[Any] | None = None):
        self.active = tools.active and tools.bound  # (forced, or calls beside a response_format)
        self.stopped = False
        self._prompt = len(gen.prompt_ids)
        self._tokens = 0
        self._own = streamers is None  # a full reply streams nothing: its watchers are fed here
        if not self.active:
            self._streamers: list[Any] = []
        else:
            self._streamers = [tools.streamer() for _ in range(gen.params.n)] if self._own else list(streamers)

    def count(self, ev: ChoiceDelta) -> None:
        """Count ``ev``'s tokens (every choice's, those of a choice already ended too: they were generated)."""
        self._tokens += len(ev.token_ids)

    def repeats(self, ev: ChoiceDelta) -> bool:
        """True when ``ev``'s choice (its text fed up to ``ev``) has begun repeating a call."""
        if not self.active or ev.finish is not None:
            return False
        streamer = self._streamers[ev.index]
        if self._own:
            streamer.deltas(ev.text, None)
        self.stopped = self.stopped or streamer.looping
        return streamer.looping

    def all_ended(self, finish: Sequence[str | None]) -> bool:
        """True when a choice was ended early and every choice has its finish: nothing left to wait for."""
        return self.stopped and all(f is not None for f in finish)

    def usage(self) -> Usage:
        """Usage of a request stopped early: its prompt and the tokens generated so far (the engine's cache count
        comes with its final event, which a stopped request does not wait for)."""
        return Usage(self._prompt, self._tokens)
