"""The playground and a reasoning model: the thinking shows in Gradio's own "thought" block above the answer (open
with a spinner while the model thinks, folded once the answer begins) and never goes back to the model with the
conversation. The random tiny model answers under a template that always opens ``<think>`` (DeepSeek-R1's and
Qwen3-Thinking's do), greedily, its tokens forced by ``logit_bias`` and the OpenAI penalties (``params``, which the
playground sends with every question). Real server, launched app, gradio_client."""

from __future__ import annotations

import re

import httpx
import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

import xllm_jupyter
from tests.server_fixtures import make_test_config, running_server
from tests.test_reasoning import SPECIAL
from xllm_jupyter.client import XllmClient
from xllm_jupyter.core.errors import InvalidRequest
from xllm_jupyter.playground.app import CUT_NOTE, part_text, to_openai_messages
from xllm_jupyter.playground.thoughts import (THOUGHT_TITLE, ThinkingClock, is_thought, reply_messages, thought_for,
                                             thought_only_note)

#: a template whose prompt always ends inside an opened block: every reply starts in the thinking
ALWAYS_OPEN = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
QUESTION = "Is it?"
#: a finished thinking's title (how long it took depends on the machine)
THOUGHT_FOR = re.compile(r"Thought for \d+(\.\d)? s")


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """A server with "think" (the random model under ALWAYS_OPEN), and the params that make it think "ok", end the
    thinking and answer "yes", then end: greedy, each biased token drops by 4 once written (presence and frequency
    penalty 2), so the next one leads by 1 at every step; the random weights (seeded) leave it 0.67 to 1.2 ahead."""
    from transformers import AutoTokenizer

    from tests.models import build_tiny_llama
    from xllm_jupyter.store.store import ModelStore

    root = tmp_path_factory.mktemp("playground-thinking")
    model = build_tiny_llama(root / "think", special=SPECIAL)
    (model / "chat_template.jinja").write_text(ALWAYS_OPEN, encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(str(model))
    (ok,), (yes,) = (tok.encode(w, add_special_tokens=False) for w in ("ok", "yes"))
    end = tok.convert_tokens_to_ids("</think>")
    store = ModelStore(root / "home")
    store.pull(str(model), "think")
    bias = {str(ok): 100, str(end): 99, str(yes): 98, str(tok.eos_token_id): 97}
    with running_server(make_test_config(root / "home"), store, "think") as info:
        info.params = {"logit_bias": bias, "presence_penalty": 2, "frequency_penalty": 2}
        yield info


def test_the_thinking_shows_in_a_thought_block_and_is_not_sent_back(thinker):
    # the server splits the reply so: the thinking "ok" apart, the answer "yes"
    body = {"model": "think", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 8,
            **thinker.params}
    direct = httpx.post(thinker.base_url + "/chat/completions", json=body, timeout=60,
                        headers={"Authorization": f"Bearer {thinker.api_key}"}).json()["choices"][0]
    assert (direct["message"]["reasoning_content"], direct["message"]["content"], direct["finish_reason"]) == (
        "ok", "yes", "stop"), direct
    with XllmClient(thinker.base_url, thinker.api_key) as client:
        pg = xllm_jupyter.playground("think", client=client, params=thinker.params)
    try:
        chat = gradio_client.Client(pg.local_url, verbose=False)
        job = chat.submit(QUESTION, [], "think", "", 0.0, 1.0, 8, None, False, api_name=pg.api_name)
        job.result(timeout=120)
        history = job.outputs()[-1][0]
        assert [m["role"] for m in history] == ["user", "assistant", "assistant"]
        thought, answer = history[1:]
        # Gradio's thought message, folded (the answer came), then the answer alone
        assert is_thought(thought) and part_text(thought["content"]) == "ok"
        assert THOUGHT_FOR.fullmatch(thought["metadata"]["title"]) and thought["metadata"]["status"] == "done"
        assert not is_thought(answer) and part_text(answer["content"]) == "yes"
        # the next turn sends the answer back, never the thinking
        assert to_openai_messages(history, "Sure?", None) == [
            {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "Sure?"}]
        # one token: all thinking, cut at max tokens; the block stays open (no spinner) above the note
        job = chat.submit(QUESTION, [], "think", "", 0.0, 1.0, 1, None, False, api_name=pg.api_name)
        job.result(timeout=120)
        history = job.outputs()[-1][0]
        thought, answer = history[1:]
        assert part_text(thought["content"]) == "ok" and not (thought["metadata"].get("status") or "")
        assert THOUGHT_FOR.fullmatch(thought["metadata"]["title"])
        assert part_text(answer["content"]) == thought_only_note() != CUT_NOTE
        assert "the model spent every token thinking and gave no answer: raise max tokens" in thought_only_note().lower()
        # neither it nor its question goes back (roles keep alternating), as ChatWidget leaves them out
        assert to_openai_messages(history, "Sure?", None) == [{"role": "user", "content": "Sure?"}]
    finally:
        pg.close()


def test_the_thought_block_is_open_with_a_spinner_until_the_answer_begins():
    thinking = reply_messages("  plan it\n", "")
    assert thinking == [{"role": "assistant", "content": "plan it",
                         "metadata": {"title": THOUGHT_TITLE, "status": "pending"}},
                        {"role": "assistant", "content": ""}]
    assert reply_messages("plan it", "The", "")[0]["metadata"]["status"] == "done"
    # once over, the title says how long it thought (the answer began, or it ended with thinking alone)
    assert reply_messages("plan it", "", seconds=2.4)[0]["metadata"]["title"] == THOUGHT_TITLE
    assert reply_messages("plan it", "The", seconds=2.4)[0]["metadata"] == {"title": "Thought for 2.4 s", "status": "done"}
    assert reply_messages("plan it", "", ended=True, seconds=12.3)[0]["metadata"] == {"title": "Thought for 12 s"}
    # a reply without thinking is one message, as before; the app's note goes under the answer
    assert reply_messages("", "The answer.", "⚠️ note", ended=True) == [
        {"role": "assistant", "content": "The answer.\n\n⚠️ note"}]
    assert not is_thought({"role": "assistant", "content": "x", "metadata": None})


def test_the_thinking_is_timed_from_its_first_piece_to_the_answers_first():
    times = iter([5.0, 5.5, 7.4, 9.0, 11.0])
    clock = ThinkingClock(lambda: next(times))
    clock.over()  # no thinking yet: nothing to end (and no time taken)
    assert clock.seconds is None and thought_for(clock.seconds) == THOUGHT_TITLE
    clock.piece()
    assert clock.seconds == 0
    clock.piece()
    clock.piece()
    assert clock.seconds == pytest.approx(2.4) and thought_for(clock.seconds) == "Thought for 2.4 s"
    # the answer's first piece ends it: a thinking sent in one piece (one stream interval) was "0.0 s"
    clock.over()
    assert clock.seconds == pytest.approx(4.0)
    clock.over()
    assert clock.seconds == pytest.approx(4.0)


def test_a_thinking_sent_in_one_piece_is_timed_to_the_answer_not_zero():
    times = iter([3.0, 4.5])
    clock = ThinkingClock(lambda: next(times))
    clock.piece()  # the whole thinking in one piece
    clock.over()  # the answer, 1.5 s later
    assert thought_for(clock.seconds) == "Thought for 1.5 s"
    assert thought_for(9.96) == "Thought for 10 s" and thought_for(61.2) == "Thought for 61 s"


def test_params_the_app_sets_itself_are_refused(thinker):
    with XllmClient(thinker.base_url, thinker.api_key) as client:
        with pytest.raises(InvalidRequest, match="stream"):
            xllm_jupyter.playground("think", client=client, params={"stream": False})


def test_a_question_whose_reply_sends_nothing_back_is_left_out_with_it():
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "⚠️ the server went away"},
               {"role": "user", "content": "Hello?"},
               {"role": "assistant", "content": "plan", "metadata": {"title": THOUGHT_TITLE, "status": "done"}},
               {"role": "assistant", "content": "Hello!"}]
    assert to_openai_messages(history, "Next?", "Be brief.") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Next?"}]


def test_in_a_browser_the_thinking_is_a_folded_block_above_the_answer(thinker):
    """Gradio draws the thought message as a block titled "Thinking" in the answer's bubble, folded once the answer
    came (its text hidden until the title is clicked)."""
    from tests.browser import chromium, require_browser

    require_browser()
    with XllmClient(thinker.base_url, thinker.api_key) as client:  # greedy, whatever the page's settings
        pg = xllm_jupyter.playground("think", client=client, params={**thinker.params, "temperature": 0})
    try:
        with chromium() as context:
            page = context.new_page()
            page.goto(pg.local_url, timeout=60_000)
            box = page.locator("#xllm-input textarea")
            box.wait_for(timeout=60_000)
            box.fill(QUESTION)
            box.press("Enter")
            page.wait_for_function("""() => document.querySelector('#xllm-chatbot').innerText.includes('yes')
                                            && document.querySelectorAll('.generating').length === 0""",
                                   timeout=60_000)
            bot = page.locator("#xllm-chatbot .bot-row").last  # the reply's bubble: its messages grouped
            title = bot.locator(".thought-group [role=button]")
            assert THOUGHT_FOR.fullmatch(title.inner_text().strip())
            reads = """(text) => [...document.querySelectorAll('#xllm-chatbot .bot-row')].pop()
                                     .innerText.trim().split(/\\s+/).join(' ') === text"""
            said = title.inner_text().strip()
            page.wait_for_function(reads, arg=f"{said} yes", timeout=10_000)  # the thinking folds, above the answer
            title.click()
            page.wait_for_function(reads, arg=f"{said} ok yes", timeout=10_000)
    finally:
        pg.close()
