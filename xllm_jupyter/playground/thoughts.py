"""A reasoning model's thinking in the playground's transcript: Gradio's own "thought" message above the answer.

The server sends the thinking apart from the answer (``reasoning_content``). The transcript shows it as a message
with ``metadata={"title": ...}``, which Gradio's Chatbot draws as a folded block in the answer's bubble: open, with a
spinner, while the model thinks (``status`` "pending"), folded once the answer begins ("done"). It is never sent back
to the model: the conversation sent back keeps the answers, as ChatWidget's and the lab panel's do.
"""

from __future__ import annotations

from typing import Any

#: the title of the thinking's block (the other front-ends' word)
THOUGHT_TITLE = "Thinking"


def is_thought(turn: Any) -> bool:
    """True for a transcript message Gradio shows as a thought (a ``metadata`` title): never the model's answer."""
    metadata = turn.get("metadata") if isinstance(turn, dict) else getattr(turn, "metadata", None)
    return isinstance(metadata, dict) and bool(metadata.get("title"))


def reply_messages(thought: str, text: str, note: str = "", *, ended: bool = False) -> list[dict[str, Any]]:
    """The transcript messages of one reply: its thinking's block (where it thought), then its answer ``text`` with
    the app's ``note`` under it (an error, the max tokens note).

    The block is open while no answer has come: with a spinner while the reply streams, without once it ``ended``
    with thinking alone (cut at max tokens, stopped), so what the model thought stays in view.
    """
    answer = {"role": "assistant", "content": f"{text}\n\n{note}".strip() if note else text}
    if not thought.strip():
        return [answer]
    status: dict[str, str] = {"status": "done"} if text else ({} if ended else {"status": "pending"})
    return [{"role": "assistant", "content": thought.strip(), "metadata": {"title": THOUGHT_TITLE, **status}}, answer]
