"""A reasoning model's thinking in the playground's transcript: Gradio's own "thought" message above the answer.

The server sends the thinking apart from the answer (``reasoning_content``). The transcript shows it as a message
with ``metadata={"title": ...}``, which Gradio's Chatbot draws as a folded block in the answer's bubble: open, with a
spinner, while the model thinks (``status`` "pending"), folded once the answer begins ("done"), titled then with how
long the model thought ("Thought for 2.4 s", as ChatGPT's and Open WebUI's blocks say it), from its first thinking piece
to its last (``ThinkingClock``). It is never sent back to the model: the conversation sent back keeps the answers, as
ChatWidget's and the lab panel's do.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from ..client.thinking import no_answer_note

#: the title of the thinking's block while the model thinks (the other front-ends' word)
THOUGHT_TITLE = "Thinking"


class ThinkingClock:
    """How long one reply's thinking took: from its first thinking piece to the first answer piece, or to the reply's
    end where no answer came (None: no thinking came). Timed to its last thinking piece instead, a thinking the
    server sent in one piece (its tokens made within one stream interval, or a long interval) took "0.0 s"."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._first: float | None = None
        self._last: float | None = None
        self._over: float | None = None

    def piece(self) -> None:
        """A thinking piece arrived now."""
        self._last = self._clock()
        if self._first is None:
            self._first = self._last

    def over(self) -> None:
        """The thinking is over now: the answer's first piece came, or the reply ended (later calls change nothing)."""
        if self._first is not None and self._over is None:
            self._over = self._clock()

    @property
    def seconds(self) -> float | None:
        """Seconds from the first thinking piece to its end (``over``), else to the last so far; None before the
        first."""
        end = self._over if self._over is not None else self._last
        return None if self._first is None or end is None else end - self._first


def thought_for(seconds: float | None) -> str:
    """The title of a finished thinking's block: "Thought for 2.4 s" (whole seconds from 10 s on)."""
    if seconds is None:
        return THOUGHT_TITLE
    return f"Thought for {seconds:.1f} s" if seconds < 9.95 else f"Thought for {seconds:.0f} s"


def is_thought(turn: Any) -> bool:
    """True for a transcript message Gradio shows as a thought (a ``metadata`` title): never the model's answer."""
    metadata = turn.get("metadata") if isinstance(turn, dict) else getattr(turn, "metadata", None)
    return isinstance(metadata, dict) and bool(metadata.get("title"))


def reply_messages(thought: str, text: str, note: str = "", *, ended: bool = False,
                   seconds: float | None = None) -> list[dict[str, Any]]:
    """The transcript messages of one reply: its thinking's block (where it thought), then its answer ``text`` with
    the app's ``note`` under it (an error, the max tokens note).

    The block is open while no answer has come: with a spinner while the reply streams, without once it ``ended``
    with thinking alone (cut at max tokens, stopped), so what the model thought stays in view. Once the thinking is
    over (the answer began, or the reply ended) its title says how long it took (``seconds``: ThinkingClock's).
    """
    answer = {"role": "assistant", "content": f"{text}\n\n{note}".strip() if note else text}
    if not thought.strip():
        return [answer]
    over = bool(text) or ended
    status: dict[str, str] = {"status": "done"} if text else ({} if ended else {"status": "pending"})
    title = thought_for(seconds) if over else THOUGHT_TITLE
    return [{"role": "assistant", "content": thought.strip(), "metadata": {"title": title, **status}}, answer]


def thought_only_note() -> str:
    """The note under a reply cut at max tokens while it thought, in the words of %%xllm, ChatWidget and ``xllm run``."""
    said = no_answer_note("length", limit="max tokens")
    return f"⚠️ {said[0].upper()}{said[1:]}."
