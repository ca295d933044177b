"""``compare()``'s warm-up sends its own one-message request ("Hi", no system prompt): an error about that request
is not the columns' error, so their own requests are still sent (a real server, a model whose template
requires a system prompt)."""

from __future__ import annotations

import shutil

import xllm_jupyter
from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.store.store import ModelStore

NEEDS_SYSTEM = "{%- if messages[0]['role'] != 'system' %}{{ raise_exception('This model needs a system prompt.') }}{%- endif %}"


def test_a_warm_up_rejected_for_its_own_messages_still_sends_the_columns(tmp_path, tiny_llama_dir):
    model = tmp_path / "needs-system"
    shutil.copytree(tiny_llama_dir, model)
    template = model / "chat_template.jinja"
    template.write_text(NEEDS_SYSTEM + template.read_text())
    store = ModelStore(tmp_path / "home")
    store.pull(str(tiny_llama_dir), TINY)
    store.pull(str(model), "needs-system")
    with running_server(make_test_config(store.home), store, TINY) as info:
        result = xllm_jupyter.compare("Name a colour.", "needs-system", system="Answer in one word.", max_tokens=2,
                                      settings=[{"temperature": 0}], client=(info.base_url, info.api_key))
    row = result.frame.iloc[0]
    assert row["error"] is None or row["error"] != row["error"], row["error"]  # None or NaN: the column answered
    assert row["completion_tokens"] > 0
