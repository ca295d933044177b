"""``%xllm <command>``: list, ps, load, unload (stop), show, pull, rm, use, status, connect, config, help.

The terminal's other verbs (serve, create, cp, hub-service, run) say in one line what to do instead.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from datetime import datetime
from typing import Any

from IPython.core.error import StdinNotImplementedError
from IPython.display import display

from ..client import discovery
from ..client.base import can_chat, model_task
from ..client.units import human_size
from ..core.errors import ModelNotFound, PermissionDenied, XllmError
from .line import command_words
from .render import Progress, Table, Text
from .session import CONFIG_KEYS, MagicState
from .verbs import HELP, SHAPES, TERMINAL_ONLY, help_for

#: verbs whose two-word line may well have been a prompt ("show tables", "load balancing"): an unknown model's
#: error line says how to ask it
_PROMPT_LIKE = frozenset({"show", "stop", "load", "use", "create"})


def as_prompt(words: list[str]) -> str:
    """The hint an error line ends with where a two-word command line may have been meant as a prompt."""
    return f" (to ask the model this instead: `%xllm -- {shlex.join(words)}`)"


def _without_keys(argv: list[str]) -> list[str]:
    """``argv`` with each ``--api-key`` value spelt ``KEY``: a line echoed into the notebook keeps no secret."""
    out: list[str] = []
    for i, word in enumerate(argv):
        if word.startswith("--api-key="):
            word = "--api-key=KEY"
        elif i and argv[i - 1] == "--api-key":
            word = "KEY"
        out.append(word)
    return out


class _Parser(argparse.ArgumentParser):
    """argparse that raises a short XllmError instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise XllmError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise XllmError(message.strip() if message else f"{self.prog}: stopped")

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """The parsed line; an empty operand (`use ''`, `connect ''`) is a usage error, not a request for ''."""
        parsed = super().parse_args(args, namespace)
        for action in self._positionals._group_actions:
            if getattr(parsed, action.dest, None) == "":
                self.error(f"{action.dest.upper()} is empty ({' '.join(self.format_usage().split())})")
        return parsed


def _parser(name: str, *args: tuple[tuple[str, ...], dict[str, Any]]) -> _Parser:
    p = _Parser(prog=f"%xllm {name}", add_help=False)
    for flags, kw in args:
        p.add_argument(*flags, **kw)
    return p


class Commands:
    """The line commands, sharing the magics' state."""

    def __init__(self, shell: Any, state: MagicState):
        self.shell = shell
        self.state = state
        self.table: dict[str, Callable[[list[str]], Any]] = {
            name: getattr(self, "do_" + name.replace("-", "_")) for name in SHAPES}

    def run(self, line: str) -> Any:
        """Run one command line (its first word names the command; an empty line: help)."""
        words = command_words(line) or ["help"]  # `pull C:\\models\\x`: a backslash outside quotes is kept
        if words[0] not in TERMINAL_ONLY and {"-h", "--help"} & set(words[1:]):
            return self.do_help(words[:1])  # `%xllm pull --help`: that command's help (the terminal's verbs say theirs)
        try:
            return self.table[words[0]](words[1:])
        except ModelNotFound as exc:
            if len(words) != 2 or words[0] not in _PROMPT_LIKE:
                raise
            # `%xllm show tables` may have been meant as a prompt: say how to ask it
            raise XllmError(exc.message + as_prompt(words)) from None

    # ---------------------------------------------------------------- models
    def do_list(self, argv: list[str]) -> None:
        """Models the server can serve (loaded or in its store)."""
        _parser("list").parse_args(argv)
        rows = []
        for m in self.state.client().models():
            x = m.get("xllm") or {}
            # TASK: an embedding model sits among the chat models here, and `%xllm use`/%%xllm refuse it
            rows.append((m.get("id"), "yes" if x.get("loaded") else "", x.get("backend") or "", x.get("context_length") or "",
                         model_task(m) or ""))
        display(Table(("MODEL", "LOADED", "BACKEND", "CONTEXT", "TASK"), rows, empty="No models: try `%xllm pull smollm2`."))

    def do_ps(self, argv: list[str]) -> None:
        """Models in memory now, with their load."""
        _parser("ps").parse_args(argv)
        rows = []
        for m in self.state.client().loaded():
            info = {**(m.get("details") or {}), **{k: v for k, v in m.items() if v is not None}}
            mode = " ".join(str(info[k]) for k in ("batch_mode", "device", "dtype") if info.get(k))
            rows.append((info.get("id") or info.get("name"), info.get("backend") or "-", human_size(info.get("memory_bytes")),
                         info.get("running", 0), info.get("queued", 0), info.get("state", "loaded"), mode or "-"))
        display(Table(("MODEL", "BACKEND", "MEMORY", "RUNNING", "QUEUED", "STATE", "MODE"), rows, empty="No models loaded."))

    def do_load(self, argv: list[str]) -> None:
        """Load a model on the server (waits until it is in memory)."""
        args = _parser("load", (("model",), {})).parse_args(argv)
        info = self.state.client().load(args.model)
        x = info.get("xllm") or {}
        if not x.get("loaded", True):  # this key may not load models (403): the client only checked the name
            display(Text(f"{args.model} exists but is not loaded: this API key may not load models (its first request loads it)"))
            return
        extra = ", ".join(str(v) for v in (x.get("backend"), f"context {x['context_length']}" if x.get("context_length") else None) if v)
        display(Text(f"Loaded {args.model}" + (f" ({extra})" if extra else "")))

    def do_unload(self, argv: list[str], name: str = "unload") -> None:
        """Unload a model on the server."""
        args = _parser(name, (("model",), {})).parse_args(argv)
        reply = self.state.client().unload(args.model, wait_for_load=True)  # (as xllm stop: a model still loading too)
        if isinstance(reply, dict) and reply.get("unloaded") is False:
            display(Text(f"{args.model} was not loaded"))
        else:
            display(Text(f"Unloaded {args.model}"))

    def do_stop(self, argv: list[str]) -> None:
        """``%xllm stop MODEL``: unload it, as ``xllm stop`` does at a terminal."""
        self.do_unload(argv, "stop")

    def do_show(self, argv: list[str]) -> None:
        """One model's details, as ``xllm show`` gives them: what it is, where it came from, how it runs."""
        args = _parser("show", (("model",), {})).parse_args(argv)
        client = self.state.client()
        entry = client.model(args.model)  # any key may read it; ModelNotFound for an unknown name
        x = entry.get("xllm") or {}
        d = x.get("details") or {}
        admin = True
        try:  # the store's record: admins only, and none for a model served from outside the store
            stored = client.manifest(str(entry.get("id") or args.model))
        except PermissionDenied:
            stored, admin = {}, False
        except XllmError:
            stored = {}
        created = stored.get("created")
        rows: list[tuple[str, Any]] = [
            ("model", entry.get("id") or args.model),
            ("task", model_task(entry)),
            ("loaded", "yes" if x.get("loaded") else "no"),
            ("backend", x.get("backend")),
            ("context", x.get("context_length")),
            ("format", stored.get("format") or d.get("format")),
            ("size", human_size(stored["size"]) if stored.get("size") else None),
            ("source", stored.get("source")),
            ("created", datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M") if isinstance(created, (int, float)) else None),
            ("digest", x.get("digest") or stored.get("digest")),
        ]
        if x.get("loaded"):
            rows += [("device", d.get("device")), ("dtype", d.get("dtype")), ("mode", d.get("mode")),
                     ("memory", human_size(d["memory_bytes"]) if d.get("memory_bytes") else None),
                     # a user key sees its own requests only (the server hides the others')
                     ("requests" if admin else "your requests",
                      f"{d['running']} running, {d.get('queued', 0)} queued" if "running" in d else None)]
        display(Table(("", ""), [(k, v) for k, v in rows if v not in (None, "")]))

    def do_run(self, argv: list[str]) -> None:
        """``%xllm run [MODEL]``: the terminal's ``xllm run``; say how a notebook asks instead."""
        m = f" -m {argv[0]}" if argv and argv[0] else ""  # `run ''`: no model named
        display(Text(f"In a notebook, ask with `%%xllm{m}` (the prompt in the cell) or `%xllm{m} PROMPT`"
                     + (f"; `%xllm use {argv[0]}` makes it the default" if m else "")))

    def do_serve(self, argv: list[str]) -> None:
        """``%xllm serve``: the terminal starts a server; a notebook already has one."""
        display(Text("This notebook already talks to an xllm server (`%xllm status` says which; `%xllm connect URL` "
                     "picks another): `xllm serve` is for a terminal, where it runs a server until Ctrl-C"))

    def do_hub_service(self, argv: list[str]) -> None:
        """``%xllm hub-service``: JupyterHub starts it from its config, never a notebook."""
        display(Text("`xllm hub-service` is started by JupyterHub from its configuration (docs/jupyterhub.md), "
                     "not from a notebook; `%xllm status` shows the server this notebook uses"))

    def do_create(self, argv: list[str]) -> None:
        """``%xllm create NAME``: the server has no route for it; say what to run where."""
        self._terminal_only("create", argv, "xllm create NAME -f Modelfile")

    def do_cp(self, argv: list[str]) -> None:
        """``%xllm cp SRC DST``: the server has no route for it; say what to run where."""
        self._terminal_only("cp", argv, "xllm cp SOURCE DESTINATION")

    def _terminal_only(self, verb: str, argv: list[str], usage: str) -> None:
        """Refuse a store-writing verb the HTTP API lacks, naming the terminal command that does it."""
        command = "xllm " + shlex.join([verb, *_without_keys(argv)]) if argv else usage
        hint = as_prompt([verb, *argv]) if verb == "create" and len(argv) == 1 and not argv[0].startswith("-") else ""
        raise XllmError(f"`%xllm {verb}` is not available from a notebook (the server has no HTTP route for it): run "
                        f"`{command}` in a terminal where the server runs, as its user, then `%xllm list`{hint}")

    def do_pull(self, argv: list[str]) -> None:
        """Pull a model into the server's store, with a progress bar."""
        args = _parser(
            "pull",
            (("source",), {}),
            (("--name",), {}),
            (("--revision",), {}),
            (("--force",), {"action": "store_true"}),
            (("--convert",), {"action": "store_true"}),
            (("--base",), {}),
        ).parse_args(argv)
        events = self.state.client().pull(args.source, name=args.name, revision=args.revision, force=args.force,
                                          convert=args.convert, base=args.base)
        progress = Progress(self.shell, f"pull {args.source}")
        result: dict[str, Any] = {}
        try:
            for event in events:
                if event.get("status") == "success":
                    result = event
                else:
                    progress.update(event)
            if not result:
                raise XllmError("the server ended the pull without saying it succeeded")
        except BaseException as exc:  # no bar left "starting…" above the error line, in the cell or its saved notebook
            progress.fail("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
            raise
        finally:
            events.close()  # an interrupt closes the response now, so the server stops the pull
        digest = str(result.get("digest") or "")
        progress.finish(f"Pulled {result.get('id')} ({result.get('format')}, {human_size(result.get('size'))}"
                        + (f", {digest.removeprefix('sha256:')[:12]}" if digest else "") + ")")

    def do_rm(self, argv: list[str]) -> None:
        """Remove models from the server's store one after another (the server unloads each first), as ``xllm rm``
        does: the first that fails stops it, the ones before it stay removed."""
        args = _parser("rm", (("model",), {"nargs": "+"})).parse_args(argv)
        client = self.state.client()
        if len(args.model) > 1:  # (nothing asks first, as the terminal does: "rm tiny and the rest" is prose, not a list)
            for model in args.model:
                try:
                    client.model(model)
                except ModelNotFound:
                    raise XllmError(f"the server has no model {model!r}: nothing was removed" + as_prompt(["rm", *argv])) from None
        for model in args.model:
            reply = client.remove(model)
            display(Text(f"Removed {reply.get('id') or model} from the server's store"))
            chosen = (self.state.defaults.model or "").lower().removesuffix(":latest")  # names are case-insensitive
            if chosen and chosen == str(reply.get("id") or "").lower():  # %%xllm would ask for a model that is gone
                display(Text("It is this notebook's default model: choose another with `%xllm use MODEL`"))

    # --------------------------------------------------------------- session
    def do_use(self, argv: list[str]) -> None:
        """Set (or show) this notebook's default model."""
        args = _parser("use", (("model",), {"nargs": "?"})).parse_args(argv)
        if args.model is None:
            current = self.state.defaults.model
            display(Text(f"Default model: {current}" if current else "No default model set: the server's default is used."))
            return
        try:  # the server resolves the name as for a request (`Tiny`, `tiny:latest`); an exact match refused those
            entry = self.state.client().model(args.model)
        except ModelNotFound:
            raise XllmError(f"the server has no model {args.model!r} (see `%xllm list`, or `%xllm pull`)"
                            + as_prompt(["use", args.model])) from None
        if not can_chat(entry):
            raise XllmError(f"{args.model!r} is an {model_task(entry)} model, not a chat model: %%xllm needs a chat model (see `%xllm list`)")
        name = str(entry.get("id") or args.model)  # the server's spelling, as `status` and `rm` compare it
        self.state.defaults.model = name
        display(Text(f"Using {name} for %%xllm in this notebook"))

    def do_status(self, argv: list[str]) -> None:
        """Which server, how it was found, and what it has loaded."""
        _parser("status").parse_args(argv)
        client = self.state.client()
        loc = self.state.location
        assert loc is not None
        health = client.health()
        how = {"connect": "chosen with %xllm connect / xllm_jupyter.connect()",
               "extension": "the XLLM_BASE_URL variable (the Jupyter extension exports it to its kernels)",
               "hub": "the JupyterHub service",
               "in-process": "a private server started for this kernel only (other notebooks cannot use it)"}
        version = self.state.about(None).get("server_version")
        # the Jupyter extension's /health says whose engine answers behind it (docs/jupyterhub.md)
        engine = {"hub-service": "the JupyterHub xllm service (this Jupyter server forwards to it)",
                  "waiting-for-hub": "none yet: this Jupyter server waits for the hub to say whether it runs the "
                                     "xllm service (503 meanwhile)",
                  "local": "this Jupyter server's own"}.get(str(health.get("engine")))
        try:
            loaded = ", ".join(m["id"] for m in client.models() if (m.get("xllm") or {}).get("loaded")) or "(none)"
        except XllmError as exc:  # e.g. the 503 of a Jupyter server still waiting for the hub
            loaded = f"(not known: {exc.message})"
        rows = [
            ("server", loc.base_url),
            ("found", how.get(loc.source, loc.source)),
            ("health", health.get("status", "?")),
        ] + ([("engine", engine)] if engine else []) + ([("hub", str(health["hub"]))] if health.get("hub") else []) + [
            ("loaded", loaded),
            ("default model", self.state.defaults.model or "(server default)"),
            ("chat turns", str(self.state.chat.turns)),
        ] + ([("server version", version)] if version else [])
        display(Table(("", ""), rows))

    def do_connect(self, argv: list[str]) -> None:
        """Use the server at URL from now on (no URL: discover again)."""
        args = _parser("connect", (("url",), {"nargs": "?"}), (("--token",), {"nargs": "?", "const": ""})).parse_args(argv)
        token = args.token
        if token == "":
            import getpass

            try:
                token = getpass.getpass("xllm token: ") or None
            except (StdinNotImplementedError, EOFError):  # nbconvert, voila, allow_stdin=False; a terminal's closed stdin
                # (XLLM_API_KEY alone is sent only to the server XLLM_BASE_URL names: both, then `%xllm connect`)
                raise XllmError("this frontend cannot ask for the token: call xllm_jupyter.connect(URL, token) with the "
                                "token from a variable, or set XLLM_BASE_URL to the URL and XLLM_API_KEY to the "
                                "token") from None
        if args.url is None and args.token is None:
            discovery.disconnect()
            loc = self.state.locate()
            discovery.verify(loc)
        else:
            loc = discovery.connect(args.url, token)
        self.state.client()
        display(Text(f"Connected to {loc.base_url} ({loc.source})"))

    def do_config(self, argv: list[str]) -> None:
        """Show the defaults, or set them: ``%xllm config temperature=0.2 format=code``."""
        for item in argv:
            key, sep, value = item.partition("=")
            if not sep:
                raise XllmError(f"expected key=value, got {item!r}; settings are: {', '.join(CONFIG_KEYS)}")
            self.state.defaults.set(key, value)
        d = self.state.defaults
        rows = [(k, "" if getattr(d, k) is None else str(getattr(d, k))) for k in CONFIG_KEYS]
        display(Table(("SETTING", "VALUE"), rows))

    def do_help(self, argv: list[str]) -> None:
        """The magics' usage, or one command's (``%xllm help pull``)."""
        if argv and argv[0] not in SHAPES:  # only reached past a failed question: `%xllm help me -x`
            raise XllmError(f"%xllm help: no command {argv[0]!r} (commands: {', '.join(SHAPES)})")
        display(Text(help_for(argv[0]) if argv else HELP))
