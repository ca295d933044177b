"""The notebook API (chat, profile, compare) against the real session server serving the tiny Llama."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import httpx
import matplotlib
import pytest

import xllm_jupyter
from tests.server_fixtures import TINY
from xllm_jupyter.client import ServerUnavailable, XllmClient
from xllm_jupyter.core.errors import InvalidRequest, ModelNotFound
from xllm_jupyter.notebook.compare import CompareResult
from xllm_jupyter.notebook.diffing import diff_html, unified_diff, word_diff
from xllm_jupyter.notebook.metrics import parse_metrics
from xllm_jupyter.notebook.profile import ProfileResult

# The API draws on plain Figure objects (no pyplot); Agg keeps any stray pyplot use headless.
matplotlib.use("Agg")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def endpoint(xllm_server):
    """The ``client=`` form most tests use: a (base_url, api_key) pair."""
    return (xllm_server.base_url, xllm_server.api_key)


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ----------------------------------------------------------------------- chat
def test_chat_streamed_and_not_agree(endpoint):
    params = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
    text = xllm_jupyter.chat("Say something", TINY, client=endpoint, **params)
    pieces = list(xllm_jupyter.chat("Say something", TINY, client=endpoint, stream=True, **params))
    assert isinstance(text, str) and text
    assert len(pieces) > 1 and "".join(pieces) == text


def test_chat_takes_messages_a_system_prompt_and_every_client_form(xllm_server, endpoint):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    params = {"temperature": 0, "max_tokens": 4, "ignore_eos": True}
    with XllmClient(xllm_server.base_url, xllm_server.api_key) as c:
        texts = {
            xllm_jupyter.chat(messages, TINY, system="Be brief.", client=form, **params)
            for form in (endpoint, c, xllm_server)  # a pair, an XllmClient, anything with base_url/api_key
        }
        assert len(texts) == 1
        # the client passed in is left open for its owner
        assert c.models()


def test_chat_without_model_or_client_uses_the_discovered_server(xllm_server, monkeypatch):
    from xllm_jupyter.client import discovery

    monkeypatch.setattr(discovery, "_connected", None)  # no earlier connect() in this process
    monkeypatch.setenv("XLLM_BASE_URL", xllm_server.base_url)
    monkeypatch.setenv("XLLM_API_KEY", xllm_server.api_key)
    monkeypatch.delenv("XLLM_MODEL", raising=False)
    assert isinstance(xllm_jupyter.chat("hi", max_tokens=3), str)


def test_a_server_named_without_a_key_never_gets_the_environments(xllm_server, monkeypatch):
    """``client=URL`` (or ``(URL, None)``) for a server other than ``XLLM_BASE_URL``'s sends no key. It fell back on
    ``XLLM_API_KEY``, which the Jupyter extension sets to the Jupyter server's token: that token went to whatever
    server the notebook named. The server the environment names still gets its key."""
    import http.server
    import json
    import threading

    from xllm_jupyter.widgets import ChatWidget

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = {"object": "list", "data": [{"id": "m", "object": "model"}]} if self.command == "GET" else {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{other.server_address[1]}/v1"
    try:
        monkeypatch.setenv("XLLM_BASE_URL", xllm_server.base_url)
        monkeypatch.setenv("XLLM_API_KEY", "the-jupyter-token")
        assert xllm_jupyter.chat("hi", "m", client=url) == "ok"
        assert xllm_jupyter.chat("hi", "m", client=(url, None)) == "ok"
        ChatWidget("m", client=url).close()
        assert seen and set(seen) == {None}, seen
        monkeypatch.setenv("XLLM_BASE_URL", url + "/")  # the environment's server: its key goes with it
        assert xllm_jupyter.chat("hi", "m", client=url) == "ok"
        assert seen[-1] == "Bearer the-jupyter-token"
    finally:
        other.shutdown()
        other.server_close()


def test_chat_errors_are_clear(endpoint):
    with pytest.raises(ModelNotFound, match="no-such-model"):
        xllm_jupyter.chat("hi", "no-such-model", client=endpoint)
    with pytest.raises(InvalidRequest, match="prompt"):
        xllm_jupyter.chat("   ", TINY, client=endpoint)
    with pytest.raises(InvalidRequest, match="prompt"):
        xllm_jupyter.chat([{"content": "no role"}], TINY, client=endpoint)
    with pytest.raises(InvalidRequest, match="client="):
        xllm_jupyter.chat("hi", TINY, client=42)
    with pytest.raises(InvalidRequest, match="temperature"):
        xllm_jupyter.chat("hi", TINY, client=endpoint, temperature=9)
    with pytest.raises(ServerUnavailable):
        xllm_jupyter.chat("hi", TINY, client=("http://127.0.0.1:9/v1", None))


def test_text_and_numbers_json_cannot_carry_are_a_clear_error(endpoint):
    """A prompt with a lone surrogate (bytes decoded with errors='surrogateescape', as ``os.fsdecode`` does) raised
    httpx's bare UnicodeEncodeError, and ``temperature=nan`` a ValueError: not the XllmError the API promises."""
    undecodable = b"caf\xe9".decode("utf-8", "surrogateescape")
    with pytest.raises(InvalidRequest, match=r"messages\[0\]\.content is not valid Unicode text: '\\udce9' at position 3"):
        xllm_jupyter.chat(undecodable, TINY, client=endpoint, max_tokens=1)
    with pytest.raises(InvalidRequest, match=r"messages\[0\]\.content is not valid Unicode"):
        list(xllm_jupyter.chat("hi", TINY, system=undecodable, client=endpoint, stream=True, max_tokens=1))
    with pytest.raises(InvalidRequest, match="temperature must be a finite number, not nan"):
        xllm_jupyter.chat("hi", TINY, client=endpoint, temperature=math.nan)
    with pytest.raises(InvalidRequest, match=r"stop\[0\] is not valid Unicode"):
        xllm_jupyter.chat("hi", TINY, client=endpoint, stop=[undecodable], max_tokens=1)
    # a key (httpx's bare UnicodeEncodeError still), and half of a UTF-16 pair, which no byte left: the hint says so
    with pytest.raises(InvalidRequest, match=r"^metadata's key is not valid Unicode text: '\\udce9' at position 3"):
        xllm_jupyter.chat("hi", TINY, client=endpoint, metadata={undecodable: "x"}, max_tokens=1)
    with pytest.raises(InvalidRequest, match=r"'\\ud83d' at position 3 \(half of a UTF-16 surrogate pair\?\)"):
        xllm_jupyter.chat("hi \ud83d\ude00", TINY, client=endpoint, max_tokens=1)


def test_a_streamed_chat_with_several_choices_is_the_first_ones(endpoint):
    """``chat(..., n=2, stream=True)`` mixed both choices' pieces into one text (each chunk carries one choice, and
    the first choice of every chunk was taken); now it is the first choice's, as without ``stream``."""
    from xllm_jupyter.client.base import delta_text

    with XllmClient(*endpoint) as c:
        chunks = [ch for ch in c.stream_chunks("Say hi", TINY, n=2, max_tokens=4, ignore_eos=True, seed=7)
                  if ch.get("choices")]
    by_choice = {0: "", 1: ""}
    for ch in chunks:
        by_choice[ch["choices"][0]["index"]] += ch["choices"][0].get("delta", {}).get("content") or ""
    assert by_choice[1], "the second choice said nothing: pick another prompt"
    assert "".join(delta_text(ch) for ch in chunks) == by_choice[0]
    # xllm_jupyter.chat returns one reply: n=2 generated a second on the shared engine only to drop it (a stream
    # mixed the two, then kept the first); it is refused before anything is sent, streamed or not, iterated or not
    for stream in (False, True):
        with pytest.raises(InvalidRequest, match=r"chat\(\) returns one reply, so n must be 1 \(got 2\)") as caught:
            xllm_jupyter.chat("Say hi", TINY, n=2, max_tokens=4, stream=stream, client=endpoint)
        assert caught.value.param == "n"
    assert xllm_jupyter.chat("Say hi", TINY, n=1, max_tokens=2, seed=7, client=endpoint)  # seeded: some text


def test_closing_a_chat_stream_cancels_on_the_server(xllm_server, endpoint):
    engine = xllm_server.engine
    before = engine.stats(TINY).cancelled
    stream = xllm_jupyter.chat("go on", TINY, client=endpoint, stream=True, max_tokens=1500, ignore_eos=True)
    assert next(stream)
    stream.close()
    assert wait_for(lambda: engine.stats(TINY).cancelled > before), "the server did not cancel the job"


def test_a_chat_stream_never_read_holds_no_connection(xllm_home, tiny_catalog):
    """Picking the server's default model opened a connection that a ``stream=True`` iterator never read (closed or
    dropped unread: a generator's body never ran) kept open until garbage collection; nothing stays open now. A
    server of its own counts them (``xllm_connections_open``; each scrape on a connection of its own, closed after)."""
    from tests.server_fixtures import make_test_config, running_server
    from tests.test_metrics_health_cache import scrape, value

    with running_server(make_test_config(xllm_home), tiny_catalog, TINY) as server:
        endpoint = (server.base_url, server.api_key)

        def only_the_scrape_open() -> bool:  # the server hears a close when its loop next runs: polled, not timed
            def now() -> float:
                with httpx.Client(base_url=server.root, headers={"Authorization": f"Bearer {server.api_key}"},
                                  timeout=60) as http:
                    return value(scrape(http), "xllm_connections_open")
            return wait_for(lambda: now() == 1, timeout=30)

        assert only_the_scrape_open()
        stream = xllm_jupyter.chat("hi", client=endpoint, stream=True, max_tokens=2)  # no model: the server's default
        assert only_the_scrape_open(), "a stream never read holds a connection"
        stream.close()
        dropped = xllm_jupyter.chat("hi", client=endpoint, stream=True, max_tokens=2)
        del dropped
        assert only_the_scrape_open()
        list(xllm_jupyter.chat("hi", client=endpoint, stream=True, max_tokens=2))
        assert only_the_scrape_open()  # read to its end: its own client closed with it


# -------------------------------------------------------------------- profile
def test_profile_measures_every_request(endpoint):
    result = xllm_jupyter.profile(TINY, concurrency=(1, 2), prompt_tokens=(16, 80), max_tokens=6, client=endpoint, sample_interval=0.05)
    assert isinstance(result, ProfileResult)
    frame = result.frame
    assert len(frame) == 2 * (1 + 2)
    assert set(frame["concurrency"]) == {1, 2} and set(frame["prompt_tokens"]) == {16, 80}
    assert frame["error"].isna().all()
    assert (frame["completion_tokens"] == 6).all()  # EOS ignored: every request generates max_tokens
    assert ((frame["ttft_s"] > 0) & (frame["ttft_s"] <= frame["latency_s"])).all()
    # (a request whose 6 tokens reached the client in one piece, as a busy machine can deliver them, has no gap)
    assert (frame["tok_per_s"] > 0).all() and frame["itl_p50_s"].notna().any()
    # the prompt-length sweep really changes the prompt the server sees
    by_len = frame.groupby("prompt_tokens")["prompt_tokens_actual"].min()
    assert by_len[80] > by_len[16] and abs(by_len[80] - 80) <= 8

    summary = result.summary
    assert len(summary) == 4
    assert (summary["agg_tok_per_s"] > 0).all() and (summary["requests"] == summary["concurrency"]).all()
    assert (summary["ttft_p50_s"] <= summary["ttft_p99_s"]).all()
    assert 0 < len(result.itl) <= len(frame) * 5  # at most one gap between each of 6 pieces

    assert not result.memory.empty, result.metrics_error
    assert (result.memory["memory_bytes"] > 0).all() and result.memory["t_s"].is_monotonic_increasing

    assert set(result.figures) == {"ttft", "tok_per_s", "itl", "throughput", "memory"}
    for name, fig in result.figures.items():
        assert fig.axes and fig.axes[0].has_data(), f"figure {name!r} is empty"
    line = result.figures["throughput"].axes[0].lines[0]
    assert list(line.get_xdata()) == [1, 2]


def test_profile_exports(endpoint, tmp_path):
    result = xllm_jupyter.profile(TINY, concurrency=1, prompt_tokens=8, max_tokens=3, client=endpoint)
    path = result.to_csv(tmp_path / "requests.csv")
    assert path.read_text().splitlines()[0].startswith("model,concurrency,prompt_tokens")
    assert result.to_csv(tmp_path / "summary.csv", "summary").is_file()
    pngs = result.save_figures(tmp_path / "figs")
    assert len(pngs) == 5 and all(p.read_bytes().startswith(PNG) for p in pngs)
    page = result._repr_html_()
    assert "<table" in page and page.count("data:image/png;base64,") == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": ()}, "concurrency"),
        ({"concurrency": (1, "2")}, "concurrency"),
        ({"concurrency": 10_000}, "at most"),
        ({"prompt_tokens": -5}, "prompt_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"repeats": True}, "repeats"),
    ],
)
def test_profile_rejects_bad_sweeps(endpoint, kwargs, match):
    with pytest.raises(InvalidRequest, match=match):
        xllm_jupyter.profile(TINY, client=endpoint, **kwargs)


def test_profile_of_a_missing_model_fails_fast(endpoint):
    with pytest.raises(ModelNotFound):
        xllm_jupyter.profile("no-such-model", concurrency=1, prompt_tokens=8, max_tokens=2, client=endpoint)


def test_parse_metrics_reads_the_exposition(xllm_server):
    with XllmClient(xllm_server.base_url, xllm_server.api_key) as c:
        c.chat("hi", TINY, max_tokens=2)
        sample = parse_metrics(c.metrics_text())
    assert sample.models.get(TINY, 0) > 0 and sample.memory_bytes >= sample.models[TINY]
    assert sample.generation_tokens >= 2 and sample.prompt_tokens > 0


# -------------------------------------------------------------------- compare
def test_compare_settings_side_by_side(endpoint):
    settings = [{"temperature": 0, "ignore_eos": True}, {"temperature": 1.5, "seed": 7, "ignore_eos": True}]
    result = xllm_jupyter.compare("Write a line", TINY, settings=settings, max_tokens=8, client=endpoint)
    assert isinstance(result, CompareResult)
    frame = result.frame
    assert list(frame["label"]) == ["temperature=0, ignore_eos=True", "temperature=1.5, seed=7, ignore_eos=True"]
    assert list(frame["model"]) == [TINY, TINY]
    assert (frame["completion_tokens"] == 8).all() and frame["error"].isna().all()
    assert ((frame["ttft_s"] > 0) & (frame["ttft_s"] <= frame["latency_s"]) & (frame["tok_per_s"] > 0)).all()
    assert list(frame["text"]) == result.texts and all(result.texts)
    assert frame["params"][1] == {"max_tokens": 8, "temperature": 1.5, "seed": 7, "ignore_eos": True}
    # greedy vs hot sampling on random weights: the replies differ, and the diff says how
    assert result.texts[0] != result.texts[1]
    assert "[-" in result.diff() or "{+" in result.diff()
    assert result.diff(0, 0) == result.texts[0]
    assert result.diff("temperature=0, ignore_eos=True", 1, mode="unified").startswith("--- ")
    page = result._repr_html_()
    assert page.count("<th>temperature") == 2
    assert "<ins" in page or "<del" in page


def test_compare_models_runs_every_column_and_keeps_failures(endpoint):
    result = xllm_jupyter.compare("hi", [TINY, TINY, "no-such-model"], max_tokens=4, client=endpoint)
    assert result.labels == [TINY, f"{TINY} #2", "no-such-model"]
    frame = result.frame
    assert frame["error"][:2].isna().all() and "no-such-model" in frame["error"][2]
    assert (frame["completion_tokens"][:2] > 0).all() and frame["completion_tokens"][2] == 0


def test_compare_rejects_bad_input(endpoint):
    with pytest.raises(InvalidRequest, match="models"):
        xllm_jupyter.compare("hi", client=endpoint)
    with pytest.raises(InvalidRequest, match="one model"):
        xllm_jupyter.compare("hi", [TINY, TINY], settings=[{}, {}], client=endpoint)
    with pytest.raises(InvalidRequest, match="settings"):
        xllm_jupyter.compare("hi", TINY, settings={"temperature": 0}, client=endpoint)
    with pytest.raises(InvalidRequest, match="max_tokens"):
        xllm_jupyter.compare("hi", TINY, max_tokens=0, client=endpoint)
    with pytest.raises(InvalidRequest, match="'stream'"):
        xllm_jupyter.compare("hi", TINY, settings=[{"stream": False}], client=endpoint)
    with pytest.raises(InvalidRequest, match="'n'"):
        xllm_jupyter.compare("hi", TINY, settings=[{"n": 2}], client=endpoint)
    result = xllm_jupyter.compare("hi", [TINY], max_tokens=2, client=endpoint)
    with pytest.raises(InvalidRequest, match="out of range"):
        result.diff(0, 3)
    with pytest.raises(InvalidRequest, match="mode"):
        result.diff(0, 0, mode="chars")


async def test_sync_api_works_inside_a_running_event_loop(endpoint):
    # Jupyter kernels run their own loop on the main thread; the API must not trip over it.
    result = xllm_jupyter.compare("hi", TINY, settings=[{"temperature": 0}], max_tokens=3, client=endpoint)
    assert result.frame["error"].isna().all()


def test_word_and_unified_diffs():
    assert word_diff("the cat sat", "the dog sat") == "the [-cat-]{+dog+} sat"
    assert word_diff("a b", "a b c") == "a b{+ c+}"
    assert unified_diff("x\ny\n", "x\nz\n", "l", "r").splitlines() == ["--- l", "+++ r", "@@ -1,2 +1,2 @@", " x", "-y", "+z"]
    assert unified_diff("same", "same") == ""
    page = diff_html("<a>", "<b>")
    assert "&lt;a&gt;" in page and "<del" in page and "<ins" in page


def test_html_diff_keeps_a_replaced_word_apart_from_its_replacement():
    """The CompareWidget's diff view: "is a rare" against "is terracota" showed the struck-out "a" and the added
    "terracota" run together ("aterracota"), the text having no space between them."""
    import re

    page = diff_html("it is a rare one", "it is terracota one")
    replaced = re.search(r'<del style="([^"]*)">a rare</del><ins style="[^"]*">terracota</ins>', page)
    assert replaced and "margin-right" in replaced.group(1), page
    # a word only removed or only added sits between spaces of the text already: no gap added
    assert "margin-right" not in diff_html("it is a rare one", "it is one")
    assert "margin-right" not in diff_html("it is one", "it is a rare one")


# ----------------------------------------------------------------- packaging
def test_notebook_api_is_exported_lazily():
    code = (
        "import sys, xllm_jupyter\n"
        "heavy = [m for m in ('pandas', 'matplotlib', 'ipywidgets') if m in sys.modules]\n"
        "from xllm_jupyter.notebook import api, compare, profile\n"
        "assert xllm_jupyter.chat is api.chat and xllm_jupyter.profile is profile.profile\n"
        "assert xllm_jupyter.compare is compare.compare\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_nan_never_leaks_into_a_finished_measurement(endpoint):
    # seeded: an end token drawn first is no text piece, and no first piece is a NaN TTFT (by design)
    result = xllm_jupyter.compare("hi", TINY, settings=[{"max_tokens": 1, "seed": 7}], client=endpoint)
    row = result.frame.iloc[0]
    assert row["completion_tokens"] == 1 and math.isnan(row["tok_per_s"])  # one token: no decode speed
    assert row["ttft_s"] > 0 and row["latency_s"] >= row["ttft_s"]


# ------------------------------------------------------------------ the loop
def test_background_loop_close_finalizes_open_async_generators():
    """An async generator left suspended (httpx's line iterators after ``[DONE]``) is closed by ``close()``.

    Without it, a generator collected after the loop closed scheduled its ``aclose`` on a
    dead loop: JupyterLab showed "Task was destroyed but it is pending!" under compare()'s table.
    """
    import gc

    from xllm_jupyter.notebook.loop import BackgroundLoop

    closed: list[bool] = []
    kept: list = []

    async def lines():
        try:
            yield "a"
            yield "b"
        finally:
            closed.append(True)

    async def read_one() -> str:
        gen = lines()
        kept.append(gen)  # alive after the coroutine returns, as one in a reference cycle is
        return await gen.__anext__()

    unraisable: list = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        bg = BackgroundLoop("test-loop")
        assert bg.submit(read_one()).result(10) == "a"
        bg.close()
        assert closed == [True]  # its finally ran while the loop was still there
        kept.clear()
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert not unraisable, [u.exc_value for u in unraisable]
