"""``xllm run``'s chat commands, as `ollama run` has them: /set, /show, /load, /save, /clear and /? (the chat loop,
chat.py, reads the lines and ends the chat at /bye)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import click

from ..core.errors import XllmError
from .render import echo, terminal_safe
from .run_flags import set_command
from .thinking import set_think

BLOCK = '"""'  # a message of several lines goes between these, as in `ollama run`
HELP = (f"Type a message ({BLOCK} begins and ends one of several lines). Ctrl-C stops a reply, /clear forgets "
        "the conversation, /set verbose|quiet|format json|noformat|think|nothink|parameter|system changes how answers "
        "come, /show info|modelfile|parameters|system|template|license shows the model, /load MODEL chats with another, "
        "/save MODEL keeps this session as a model, /bye or Ctrl-D exits, /? shows this help (/? set, /? show: more).")
COMMANDS = "/set, /show, /load, /save, /clear, /bye (or /exit, /quit), /? (or /help)"
SET_HELP = """Available commands:
  /set parameter NAME VALUE   set a sampling parameter (/set parameter alone lists them)
  /set system TEXT            set the system message
  /set format json            answers in JSON            /set noformat   answers as the model likes
  /set verbose                timings after each answer  /set quiet      no timings
  /set think [high|medium|low]  a reasoning model thinks /set nothink    it does not"""
SHOW_HELP = """Available commands:
  /show info        the model's details         /show license     its license
  /show modelfile   its Modelfile               /show parameters  its parameters and this chat's
  /show system      the system message          /show template    its chat template"""
PARAMETER_HELP = """Available parameters:
  /set parameter seed INT               random seed
  /set parameter num_predict INT        most tokens per answer
  /set parameter top_k INT              sample from the k likeliest tokens
  /set parameter top_p FLOAT            sample from the tokens within this probability
  /set parameter min_p FLOAT            leave out tokens below this share of the likeliest's probability
  /set parameter temperature FLOAT      higher: more creative, lower: more coherent
  /set parameter repeat_penalty FLOAT   how strongly to penalize repetitions
  /set parameter presence_penalty FLOAT, frequency_penalty FLOAT
  /set parameter stop STRING ...        stop at any of these strings"""
SHOW_PARTS = ("info", "license", "modelfile", "parameters", "system", "template")


@dataclass
class ChatSession:
    """What the chat's commands change: the model, the conversation and the requests' parameters."""

    backend: Any
    model: str
    history: list[dict[str, str]]
    params: dict[str, Any]
    verbose: bool = False
    load_seconds: float | None = None  # the load before the next answer (its --verbose summary shows it)
    #: the system message /clear keeps (-s, or /set system)
    system: list[dict[str, str]] = field(default_factory=list)
    #: /set parameter's values under Ollama's names, for /show parameters and /save
    parameters: dict[str, Any] = field(default_factory=dict)


def _note(message: str) -> None:
    click.echo(message, err=True)


def slash_command(text: str, s: ChatSession) -> None:
    """Run one of the chat's commands (never sent to the model); an unknown one says so."""
    words = text.split()
    command, args = words[0], words[1:]
    if command == "/set":
        _set(text, args, s)
    elif command == "/show":
        _show(args, s)
    elif command == "/load":
        _load(args, s)
    elif command == "/save":
        _save(args, s)
    elif text == "/clear":
        s.history[:] = s.system
        _note("Cleared session context.")
    elif command in ("/?", "/help"):
        _note({"set": SET_HELP, "show": SHOW_HELP}.get(args[0] if args else "", HELP))
    else:
        _note(f"Unknown command '{terminal_safe(command)}'; commands: {COMMANDS}. Type /? for help.")


def _set(text: str, args: list[str], s: ChatSession) -> None:
    if args[:1] == ["parameter"]:
        set_parameter(args[1:], s)
    elif args[:1] == ["system"]:
        system = text.split(None, 2)[2].strip() if len(args) > 1 else ""
        if not system:
            _note("Usage: /set system TEXT")
            return
        s.system[:] = [{"role": "system", "content": system}]
        # in place of the one before: a system message in the middle of a chat is one many templates refuse
        s.history[:] = s.system + [m for m in s.history if m.get("role") != "system"]
        _note("Set system message.")
    elif not set_think(args, s.params):
        s.verbose = set_command(args, s.params, s.verbose)


def set_parameter(args: list[str], s: ChatSession) -> None:
    """``/set parameter NAME VALUE...``: a Modelfile PARAMETER for this chat's requests (``stop`` takes several)."""
    from pydantic import ValidationError

    from ..core.types import ModelfileDefaults
    from ..openai.model_defaults import ModelDefaults
    from ..openai.protocol import ChatCompletionRequest
    from ..store.modelfile import PARAMETERS, RECORDED_ONLY

    if len(args) < 2:
        _note(PARAMETER_HELP)
        return
    name, values = args[0], args[1:]
    try:
        if name not in PARAMETERS:
            raise ValueError(f"unknown parameter '{name}'")
        if name in RECORDED_ONLY or name == "num_ctx":  # (a model's context length is set when it loads)
            raise ValueError(f"'{name}' is a Modelfile parameter xllm keeps but does not apply to a request")
        value = [PARAMETERS[name](v) for v in values] if name == "stop" else PARAMETERS[name](values[0])
    except ValueError as exc:
        _note(f"Couldn't set parameter: {terminal_safe(str(exc))}")
        return
    fields = ModelDefaults(ModelfileDefaults(parameters={name: value})).request_fields()
    try:  # the API's ranges too (temperature up to 2, repeat_penalty above 0): else every answer after it failed
        ChatCompletionRequest.model_validate({"model": s.model, "messages": [{"role": "user", "content": "-"}], **fields})
    except ValidationError as exc:
        _note(f"Couldn't set parameter: {name}: {exc.errors()[0]['msg'].lower()}")
        return
    s.params.update(fields or {"max_tokens": None})  # (num_predict -1 or -2, no limit: the model's own budget)
    s.parameters[name] = value
    _note(f"Set parameter '{name}' to '{terminal_safe(', '.join(values if name == 'stop' else values[:1]))}'")


def _show(args: list[str], s: ChatSession) -> None:
    if len(args) != 1 or args[0] not in SHOW_PARTS:
        _note(SHOW_HELP)
        return
    part = args[0]
    if part == "system" and s.system:  # this chat's, as Ollama shows it first
        echo(s.system[0]["content"])
        return
    if part == "parameters" and s.parameters:
        echo("User defined parameters:")
        for name, value in s.parameters.items():
            for one in value if isinstance(value, list) else [value]:
                echo(f"{name:<20}{one}")
        echo("Model defined parameters:")
    from .store_cmds import show_command

    flags = {p: part == p for p in ("modelfile", "parameters", "system", "template")}
    try:
        show_command.callback(name=s.model, license_=part == "license", **flags)  # type: ignore[misc]
    except (XllmError, click.ClickException) as exc:  # (the chat goes on)
        _note(f"Error: {terminal_safe(getattr(exc, 'message', None) or str(exc))}")


def _load(args: list[str], s: ChatSession) -> None:
    from .chat import load_with_status

    if len(args) != 1:
        _note("Usage: /load MODEL")
        return
    _note(f"Loading model '{terminal_safe(args[0])}'")
    keep = s.params.get("keep_alive")
    try:
        s.load_seconds = load_with_status(s.backend, args[0], **({"keep_alive": keep} if keep is not None else {}))
    except XllmError as exc:  # an unknown model: the chat goes on with the one it had
        _note(f"Error: {terminal_safe(exc.message)}")
        return
    s.model = args[0]
    s.history[:] = s.system  # a new model, a new conversation (the system message stays), as in `ollama run`


def _save(args: list[str], s: ChatSession) -> None:
    """``/save NAME``: a model from this one with the chat's system message, parameters and turns (MESSAGE lines),
    as ``ollama run``'s /save makes one; a chat later started with it begins where this one is."""
    from ..store.modelfile import Message, Modelfile, render_modelfile
    from .store_cmds import open_store, unload_from_server

    if len(args) != 1:
        _note("Usage: /save MODEL")
        return
    turns = [Message(m["role"], m["content"]) for m in s.history if m.get("role") in ("user", "assistant")]
    system = s.system[0]["content"] if s.system else None
    try:
        store = open_store()
        # the model's own MESSAGE turns head each of its chats (the server puts them there, not in this history); a
        # new model's MESSAGE lines replace its base's, so they go first (none said yet: the base's are inherited)
        turns = _model_turns(store, s.model) + turns if turns else turns
        text = render_modelfile(Modelfile(from_=s.model, parameters=dict(s.parameters), system=system, messages=turns))
        manifest = store.create(args[0], text)
    except (XllmError, ValueError, click.ClickException) as exc:
        _note(f"Error: {terminal_safe(getattr(exc, 'message', None) or str(exc))}")
        return
    context = click.get_current_context(silent=True)
    if context is not None and context.obj is not None:
        unload_from_server(context.obj, manifest.name)  # a server would go on with what it read at its load
    _note(f"Created new model '{manifest.name}'")


def _model_turns(store: Any, model: str) -> list[Any]:
    """Model ``model``'s MESSAGE turns (none where the store has no such model: /save's create says so)."""
    from ..store.create import modelfile_of

    try:
        return list(modelfile_of(store.show(model)).messages)
    except XllmError:
        return []
