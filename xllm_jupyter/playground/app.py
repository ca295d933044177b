"""The Gradio Blocks chat app: model picker, sampling parameters, streamed answers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..client import AsyncXllmClient
from ..client.base import can_chat, delta_text
from ..client.thinking import Thinking, delta_thinking
from ..core.errors import InvalidRequest, XllmError
from ..notebook.clients import entry_defaults
from .links import TRANSCRIPT_ID
from .sending import CLEAR_ID, INPUT_ID, PRESSES_JS, SEND_ID, SENT_JS
from .stopping import Stops, arrived, until_set
from .thoughts import ThinkingClock, is_thought, reply_messages, thought_only_note

# Set before gradio is imported anywhere in this process: no usage reporting from a
# notebook (and no outbound calls that would stall on machines without a network).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

#: the name the streamed chat endpoint has in Gradio's API (``gradio_client`` uses it)
CHAT_API_NAME = "chat"
#: marks the app's own error notes in the transcript (never sent back to the model)
ERROR_PREFIX = "⚠️ "
#: the note under a reply the server ended at its max tokens (an app note: never sent back to the model)
CUT_NOTE = f"{ERROR_PREFIX}The reply stopped at the max tokens limit."
#: what the sliders show for a model the server lists no default for (OpenAI's sampling defaults)
SHOWN: dict[str, float] = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 256}
#: chat turns one playground runs at once (Enter and Send are one event); more wait in Gradio's queue, where Stop
#: still reaches them
CHAT_SLOTS = 32


@dataclass(frozen=True)
class Endpoint:
    """Where the playground sends requests: the server's OpenAI base URL and its key."""

    base_url: str
    api_key: str | None


def part_text(content: Any) -> str:
    """The text of a Gradio message's content: a string, a text part, or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        # Gradio 5/6 normalise text to {"type": "text", "text": ...}; files have no text.
        value = content.get("text", content.get("content", ""))
        return value if isinstance(value, str) else ""
    if isinstance(content, (list, tuple)):
        return "".join(part_text(part) for part in content)
    return str(content)


def to_openai_messages(
    history: Sequence[Any], message: str, system: str | None
) -> list[dict[str, str]]:
    """The OpenAI ``messages`` for a chat turn: the system prompt, earlier turns, the new message."""
    messages: list[dict[str, str]] = []
    if system and system.strip():
        messages.append({"role": "system", "content": system.strip()})
    for turn in history or ():
        if is_thought(turn):
            continue  # a reasoning model's thinking, shown apart: the conversation sent back keeps the answers
        role = (
            turn.get("role") if isinstance(turn, dict) else getattr(turn, "role", None)
        )
        content = (
            turn.get("content")
            if isinstance(turn, dict)
            else getattr(turn, "content", None)
        )
        text = part_text(content)
        if role == "assistant":
            # The app writes error notes into the transcript; they are not the model's words.
            text = text.split(ERROR_PREFIX, 1)[0].strip()
        if role in ("user", "assistant") and text:
            if role == "user" and messages and messages[-1]["role"] == "user":
                # the question before got nothing that goes back (all thinking, an error, stopped at once): it is
                # left out with its reply, as ChatWidget and `xllm run` leave it, so roles keep alternating
                messages.pop()
            messages.append({"role": role, "content": text})
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    messages.append({"role": "user", "content": message})
    return messages


def parse_seed(seed: Any) -> int | None:
    """The seed box's value as an int; empty means a random seed. Raises InvalidRequest otherwise."""
    if seed is None or isinstance(seed, bool):
        return None
    if isinstance(seed, (int, float)):
        return int(seed)
    text = str(seed).strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidRequest(
            f"the seed must be a whole number, not {text!r}", param="seed"
        ) from None


def sampling(
    temperature: float | None,
    top_p: float | None,
    max_tokens: float | None,
    seed: Any = None,
) -> dict[str, Any]:
    """Keyword parameters for the chat request from the controls (None leaves a server default)."""
    params: dict[str, Any] = {}
    seed = parse_seed(seed)
    if seed is not None:
        params["seed"] = seed
    if temperature is not None:
        params["temperature"] = float(temperature)
    if top_p is not None:
        params["top_p"] = float(top_p)
    if max_tokens:
        params["max_tokens"] = int(max_tokens)
    return params


async def stream_reply(
    endpoint: Endpoint,
    messages: list[dict[str, str]],
    model: str | None,
    params: dict[str, Any],
    finish: list[str] | None = None,
) -> AsyncIterator[str]:
    """The reply's text pieces from the shared engine, a reasoning model's thinking as ``Thinking`` pieces; closing the
    iterator cancels it there. ``finish`` gets the reply's finish reason (``stop``, ``length``...) when the server
    sends it."""
    # One client per turn: Gradio may run turns on different event loops/threads, and an
    # httpx.AsyncClient must stay on the loop that created it.
    async with AsyncXllmClient(endpoint.base_url, endpoint.api_key) as client:
        chunks = client.stream_chunks(messages, model or None, **params)
        try:
            async for chunk in chunks:
                thought = delta_thinking(chunk)
                if thought:
                    yield Thinking(thought)
                piece = delta_text(chunk)
                if piece:
                    yield piece
                for choice in chunk.get("choices") or ():
                    if finish is not None and choice.get("index", 0) == 0 and choice.get("finish_reason"):
                        finish.append(choice["finish_reason"])
        finally:
            await chunks.aclose()


async def picker_choices(endpoint: Endpoint, current: str | None) -> list[str]:
    """The chat models the server at ``endpoint`` lists now, plus ``current`` (a typed name) if missing."""
    async with AsyncXllmClient(endpoint.base_url, endpoint.api_key) as client:
        listing = await client.models()
    ids = [m.get("id") or m.get("name") for m in listing if can_chat(m)]
    return list(dict.fromkeys([*(i for i in ids if i), *([current] if current else [])]))


async def model_settings(endpoint: Endpoint, model: str | None) -> dict[str, float]:
    """What the sliders show for ``model``: the defaults the server lists for it (``xllm.defaults``), else ``SHOWN``."""
    own: dict[str, float] = {}
    if model:
        try:
            async with AsyncXllmClient(endpoint.base_url, endpoint.api_key) as client:
                own = entry_defaults(await client.model(model))
        except XllmError:  # an unknown or typed name: the first message says what is wrong
            pass
    return shown_settings(own)


def shown_settings(own: dict[str, float]) -> dict[str, float]:
    """The sliders' values: a model's own defaults (``entry_defaults``), ``SHOWN`` for the rest."""
    return {name: own.get(name, value) for name, value in SHOWN.items()}


def build_app(
    endpoint: Endpoint,
    models: Sequence[str],
    model: str | None,
    *,
    title: str = "xllm playground",
    settings: dict[str, float] | None = None,
    params: dict[str, Any] | None = None,
) -> Any:
    """The Gradio Blocks app (not launched) that chats with ``endpoint``; the sliders start at ``settings``
    (``model_settings``: the first model's own defaults); ``params``: more chat parameters every request carries."""
    import gradio as gr

    shown = {**SHOWN, **(settings or {})}
    extra = dict(params or {})
    stops = Stops()

    async def respond(
        message: str,
        history: list[Any],
        model: str,
        system: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        seed: str | None = None,
        model_defaults: bool = False,
        request: Any = None,
    ):
        """Append the user's message and stream the assistant's answer into the transcript.

        ``model_defaults``: send no temperature, top p or max tokens, so the model's own apply (a
        created model's Modelfile, the sampling it ships with, the server's default max tokens).
        """
        history = list(history or [])
        message = (message or "").strip()
        if not message:
            yield history, gr.skip()
            return
        messages = to_openai_messages(history, message, system)
        history.append({"role": "user", "content": message})
        asked = len(history)  # the reply's messages (its thinking's block, its answer) follow
        history.append({"role": "assistant", "content": ""})
        # Registered before the first update: a Stop pressed as soon as the question shows must count,
        # and so must one pressed while the question waited in Gradio's queue (all its slots taken).
        page = getattr(request, "session_hash", None) or ""
        stopped = stops.begin(page, arrived(request))
        try:
            if stopped.is_set():
                # Stop or Clear came while it waited in the queue: it is never asked
                yield ([] if stopped.cleared else history), gr.skip()
                return
            # Show the question at once (a model that loads on first use can take a while to answer). The box is
            # never touched here: the page emptied it as the question was sent (SENT_JS), and what the user has
            # typed since, while this turn waited in the queue or its reply streams, is the next question.
            yield history, gr.skip()
            text = thought = note = ""
            ended: list[str] = []
            clock = ThinkingClock()
            try:
                params = sampling(None, None, None, seed) if model_defaults else sampling(temperature, top_p, max_tokens, seed)
                async for piece in until_set(stream_reply(endpoint, messages, model, {**params, **extra}, ended), stopped):
                    if isinstance(piece, Thinking):
                        thought += piece
                        clock.piece()
                    else:
                        text += piece
                        clock.over()
                    history[asked:] = reply_messages(thought, text, seconds=clock.seconds)
                    yield history, gr.skip()
                if ended[-1:] == ["length"]:
                    # as the lab panel and ChatWidget say: a reply cut at the limit read as if the model had ended it
                    note = CUT_NOTE if text.strip() or not thought.strip() else thought_only_note()
            except XllmError as exc:
                note = f"{ERROR_PREFIX}{exc}"  # shown in the transcript as one line: no traceback in the UI
            clock.over()
            history[asked:] = reply_messages(thought, text, note, ended=True, seconds=clock.seconds)
            if stopped.cleared:
                # Clear emptied the transcript mid-reply. Clear is unqueued, so its answer can reach the
                # page before an update of this reply already sent; this last update, on the page's
                # stream after all of them, leaves the transcript empty whatever the order.
                yield [], gr.skip()
                return
            yield history, gr.skip()
        finally:
            stops.end(page, stopped)

    # Gradio fills a gr.Request argument by its type (the note at keep_stream_open says why it is set here)
    respond.__annotations__["request"] = gr.Request
    choices = list(dict.fromkeys([*(models or ()), *([model] if model else [])]))
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(
            f"### {title}\nStreaming chat with the shared xllm engine at `{endpoint.base_url}`."
        )
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Conversation", height=420, elem_id=TRANSCRIPT_ID
                )
                # lines=1: Enter sends (a taller box would take Enter as a new line)
                # the label stays hidden but names the box for screen readers
                box = gr.Textbox(
                    placeholder="Ask something and press Enter",
                    label="Message",
                    show_label=False,
                    lines=1,
                    max_lines=8,
                    elem_id=INPUT_ID,
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id=SEND_ID)
                    stop = gr.Button("Stop")
                    clear = gr.Button("Clear", elem_id=CLEAR_ID)
            with gr.Column(scale=1):
                picker = gr.Dropdown(
                    choices=choices,
                    value=model or (choices[0] if choices else None),
                    label="Model",
                    allow_custom_value=True,
                )
                system = gr.Textbox(label="System prompt", lines=3)
                model_defaults = gr.Checkbox(
                    value=True, label="The model's defaults",
                    info="Send no temperature, top p or max tokens (moving one turns this off)",
                )
                # they start at what the model's requests get while "The model's defaults" is on
                temperature = gr.Slider(
                    0.0, 2.0, value=shown["temperature"], step=0.05, label="Temperature"
                )
                top_p = gr.Slider(0.05, 1.0, value=shown["top_p"], step=0.05, label="Top p")
                max_tokens = gr.Slider(1, 2048, value=shown["max_tokens"], step=1, label="Max tokens")
                seed = gr.Textbox(label="Seed", placeholder="random", max_lines=1)
        # Only the chat turns (and the page's stream keeper, at the end) go through Gradio's queue
        # (queue=False elsewhere). A page reads every queued event's messages from one stream, which
        # the server ends when the page's last queued event completes; a question sent in that instant
        # joined the queue but its page was told the stream was still open, closed it a moment later
        # and never saw the reply (Gradio 6, seen as a first question with no answer on a loaded
        # machine). Quick events need no queue.
        for control in (temperature, top_p, max_tokens):
            # the user chose a value: send it
            control.input(lambda: False, None, model_defaults, queue=False)

        async def show_model_defaults(model: str | None, defaults_on: bool):
            """While the model's defaults are on, the sliders show them: another model picked, or turned on again."""
            if not defaults_on:
                return gr.skip(), gr.skip(), gr.skip()
            values = await model_settings(endpoint, model)
            return values["temperature"], values["top_p"], values["max_tokens"]

        # .input: the user's own changes only (this handler's own slider updates must not turn the defaults off)
        for trigger in (picker.input, model_defaults.input):
            trigger(show_model_defaults, [picker, model_defaults], [temperature, top_p, max_tokens],
                    api_name=False, show_progress="hidden", queue=False)
        inputs = [box, chatbot, picker, system, temperature, top_p, max_tokens, seed, model_defaults]
        # The engine batches concurrent users; don't let Gradio serialise them (its default is 1).
        # always_last: Enter (or Send) during a reply is not dropped but asked when the reply ends,
        # with the box and transcript as they are then (the default "once" ignored it silently).
        # One event for both: the page holds a question back only while the same event runs, so with one event
        # each, Send during a reply Enter had started (or Enter during Send's) was asked at once, beside it, and
        # the later turn's transcript, read before the first answer came, wiped that answer.
        # The box is emptied in the page as the question is sent (SENT_JS; a held one is sent when the reply ends),
        # and only the transcript shows the turn's progress: Gradio's overlay over the box, while the turn waited in
        # the queue, hid what the user typed there.
        gr.on(
            [box.submit, send.click],
            respond,
            inputs,
            [chatbot, box],
            api_name=CHAT_API_NAME,
            concurrency_limit=CHAT_SLOTS,
            trigger_mode="always_last",
            js=SENT_JS,
            show_progress_on=chatbot,
        )

        async def stop_replies(request: gr.Request) -> None:
            """Stop: the page's replies end themselves, keeping their text so far (see ``Stops``)."""
            stops.stop(request.session_hash or "", sent=arrived(request))

        async def clear_replies(request: gr.Request) -> tuple[list, str]:
            """Clear: empty the transcript and the box; the page's replies end with an empty transcript."""
            stops.stop(request.session_hash or "", cleared=True, sent=arrived(request))
            return [], ""

        async def cleared(request: gr.Request) -> None:
            """The transcript's trash icon (the page has emptied it): the page's replies end as for Clear."""
            stops.stop(request.session_hash or "", cleared=True, sent=arrived(request))

        for handler in (stop_replies, clear_replies, cleared):
            handler.__annotations__["request"] = gr.Request
        # Unqueued, so it runs at once even while the page's replies hold their queue slots.
        stop.click(stop_replies, None, None, api_name=False, queue=False, show_progress="hidden")
        # In the page only: what tells a question the user sent from one the page held back (sending.py)
        app.load(None, None, None, js=PRESSES_JS, api_name=False, queue=False)
        # Clear stops a reply in progress too (else it keeps streaming into the emptied transcript), from
        # inside as Stop does: with Gradio's cancels= an update already on its way refilled the transcript.
        clear.click(clear_replies, None, [chatbot, box], api_name=False, queue=False, show_progress="hidden")
        chatbot.clear(cleared, None, None, api_name=False, queue=False, show_progress="hidden")

        async def refresh_models(current: str | None):
            """The picker's choices as the server lists them when a page opens."""
            try:
                return gr.update(choices=await picker_choices(endpoint, current))
            except XllmError:
                return gr.skip()  # keep the list the app started with

        # A playground lives as long as its Jupyter server: a model pulled or created since it
        # started must be offered to the next page that opens, not only to a typed name.
        # Unqueued: a queued load event ending as the first question is sent is the race above.
        app.load(
            refresh_models, picker, picker, api_name=False, show_progress="hidden", queue=False
        )

        # The narrower form of that race: a question sent as the page's last chat turn ends (its stream's
        # end already on the way) was never answered either. One queued event that lasts as long as the
        # page keeps the page's stream open, so a chat turn is never its last queued event; it ends when
        # the page leaves (Gradio's unload, once the page's heartbeat stops).
        open_pages: dict[str, asyncio.Event] = {}

        async def keep_stream_open(request: gr.Request) -> None:
            left = open_pages.setdefault(request.session_hash or "", asyncio.Event())
            try:
                await left.wait()
            finally:
                open_pages.pop(request.session_hash or "", None)

        async def page_left(request: gr.Request) -> None:
            stops.forget(request.session_hash or "")
            left = open_pages.get(request.session_hash or "")
            if left is not None:
                left.set()

        for handler in (keep_stream_open, page_left):
            # Gradio fills a gr.Request argument by its type; with postponed annotations it sees a string
            # naming a module-level `gr` this module does not have (gradio is imported lazily)
            handler.__annotations__["request"] = gr.Request
        app.load(keep_stream_open, None, None, api_name=False, show_progress="hidden",
                 concurrency_limit=None)
        app.unload(page_left)
    return app
