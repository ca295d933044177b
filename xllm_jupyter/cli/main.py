"""The ``xllm`` command line: serve, manage and chat with models, Ollama-style.

Errors are translated once, here at the edge: any ``XllmError`` becomes a one-line
``Error: ...`` on stderr and exit code 1; click's usage errors exit 2.
"""

from __future__ import annotations

import time
from typing import Any

import click

from .. import __version__
from ..client.units import human_size
from ..core.errors import AuthenticationError, PermissionDenied, XllmError
from .chat import run_command
from .create_cmd import cp_command, create_command
from .render import cell, stdout_console, terminal_safe, until
from .settings import KEY_HELP, URL_HELP, Settings, server_options
from .store_cmds import list_command, pull_command, rm_command, show_command

#: the exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it
EXIT_INTERRUPTED = 130
#: other names of commands, as Ollama has them (`ollama ls`); not listed twice in --help
ALIASES = {"ls": "list"}


class XllmGroup(click.Group):
    """A click group that renders XllmError as a one-line message with exit code 1."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name`` names, or the one it is an alias of (``ls`` = ``list``)."""
        return super().get_command(ctx, ALIASES.get(cmd_name, cmd_name))

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; an XllmError becomes ``Error: <message>`` (no traceback)."""
        try:
            return super().invoke(ctx)
        except (AuthenticationError, PermissionDenied) as exc:
            hint = "check --api-key / XLLM_API_KEY"
            if getattr(ctx.obj, "env_key_withheld", False):
                hint = "no key sent: XLLM_API_KEY goes only to the server XLLM_BASE_URL names; pass --api-key"
            raise click.ClickException(terminal_safe(f"{exc.message} ({hint})")) from None
        except XllmError as exc:  # a server's message may quote what it was sent, or be hostile: no escapes
            raise click.ClickException(terminal_safe(exc.message)) from None
        except KeyboardInterrupt:
            # Ctrl-C while loading, pulling or creating: a short note and the shell's usual 130,
            # not click's "Aborted!" and exit 1
            click.echo("(interrupted)", err=True)
            ctx.exit(EXIT_INTERRUPTED)


@click.group(cls=XllmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar="XLLM_BASE_URL", metavar="URL", help=URL_HELP)
@click.option("--api-key", metavar="KEY", help=KEY_HELP)  # XLLM_API_KEY: the client's rule, see Settings.client
@click.version_option(__version__, prog_name="xllm")
@click.pass_context
def main(ctx: click.Context, url: str | None, api_key: str | None) -> None:
    """xllm: one shared local LLM engine behind an OpenAI-compatible API."""
    ctx.obj = Settings(url, api_key)


@main.command("serve")
@click.option("--host", help="Interface to listen on [config server.host; default 127.0.0.1].")
@click.option("--port", type=click.IntRange(0, 65535), help="Port to listen on [config server.port; default 8900].")
@click.option("-m", "--model", "models", multiple=True, metavar="NAME", help="Model to load at start (repeatable).")
@click.option("--api-key", "api_keys", multiple=True, metavar="KEY", help="Require this API key from clients (repeatable) [config server.api_keys].")
@click.pass_context
def serve_command(ctx: click.Context, host: str | None, port: int | None, models: tuple[str, ...], api_keys: tuple[str, ...]) -> None:
    """Run the OpenAI-compatible server until Ctrl-C."""
    from ..core.config import load_config

    if not api_keys and ctx.parent is not None and ctx.parent.get_parameter_source("api_key") == click.ParameterSource.COMMANDLINE:
        # the group's --api-key is the key a client sends; serving with it silently ignored would
        # leave a server the user meant to protect open
        raise click.UsageError("--api-key before `serve` is the client's key and does not protect the server: "
                               "write `xllm serve --api-key KEY`", ctx=ctx)

    overrides = {"server": {"host": host, "port": port, "api_keys": list(api_keys) or None}}
    config = load_config(overrides=overrides)
    # Imported lazily: the one place a front-end reaches into the server layer.
    from ..server.standalone import serve

    try:
        serve(config, list(models))
    except KeyboardInterrupt:
        pass


@main.command(
    "hub-service",
    short_help="Run the JupyterHub service.",  # `xllm --help` cut the docstring at "`python -m..."
    add_help_option=False,  # --help goes to the service's own parser, so both spellings print the same
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def hub_service_command(args: tuple[str, ...]) -> None:
    """Run the JupyterHub service (same as `python -m xllm_jupyter.hub`)."""
    # Imported lazily, like `serve`: the hub service is a server edge, not a client
    from ..hub.__main__ import main as hub_main

    raise SystemExit(hub_main(list(args), prog="xllm hub-service"))


@main.command("ps")
@server_options
@click.pass_obj
def ps_command(settings: Settings) -> None:
    """Show the models a running server has loaded."""
    from rich.table import Table

    loaded = settings.client().loaded()
    console = stdout_console()
    if not loaded:
        console.print("No models loaded.")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "BACKEND", "MEMORY", "RUNNING", "QUEUED", "UNTIL"):
        table.add_column(col, no_wrap=True)
    table.add_column("MODE")  # the one that wraps on a narrow terminal, so names and numbers are never cut
    now = time.time()
    for item in loaded:
        # /admin/models puts the common facts at the top level; older shapes kept them in details
        info = {**(item.get("details") or {}), **{k: v for k, v in item.items() if v is not None}}
        table.add_row(*(cell(v) for v in (  # the server's words, as text: never rich markup
            info.get("id") or info.get("name") or "?",
            info.get("backend") or "-",
            human_size(info.get("memory_bytes")),
            info.get("running", "-"),
            info.get("queued", "-"),
            # keep_alive's end, as ollama ps shows it (the top level only: details may hold another shape)
            "-" if item.get("state") == "loading" or "expires_at" not in item else until(item.get("expires_at"), now),
            _mode(info),
        )))
    if not console.is_terminal:  # a pipe gets whole lines (one per model, for awk and grep), however wide
        from rich.measure import Measurement

        console.width = max(console.width, Measurement.get(console, console.options.update_width(1_000), table).maximum)
    console.print(table)


def _mode(info: dict[str, Any]) -> str:
    """How a loaded model runs ("continuous-batching cpu float32 batch≤16")."""
    if info.get("state") == "loading":  # nothing else is known yet; a load may wait for models in use to go idle
        return "loading, waiting for room" if info.get("waiting_for_room") else "loading"
    parts = [str(info.get("batch_mode") or info.get("mode") or "")] + [str(info[k]) for k in ("device", "dtype") if info.get(k)]
    if info.get("max_batch_size"):
        parts.append(f"batch≤{info['max_batch_size']}")
    return " ".join(p for p in parts if p) or "-"


@main.command("stop")
@click.argument("model")
@server_options
@click.pass_obj
def stop_command(settings: Settings, model: str) -> None:
    """Unload MODEL on a running server."""
    from .chat import valid_text

    model = valid_text(model)  # a byte that is not UTF-8 failed the JSON encoder with a traceback
    reply = settings.client().unload(model, wait_for_load=True)  # (as ollama stop: a model still loading too)
    if isinstance(reply, dict) and reply.get("unloaded") is False:
        raise click.ClickException(f"model '{model}' is not loaded (see `xllm ps`)")
    click.echo(f"Stopped {model}")


main.add_command(run_command)
main.add_command(pull_command)
main.add_command(list_command)
main.add_command(show_command)
main.add_command(rm_command)
main.add_command(create_command)
main.add_command(cp_command)


if __name__ == "__main__":  # pragma: no cover - `python -m xllm_jupyter.cli.main`
    main()
