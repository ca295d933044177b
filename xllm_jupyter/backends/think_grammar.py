"""A reasoning model's grammar that starts after its thinking, as vLLM's ``--reasoning-parser`` starts it.

A constraint with thinking markers (``Constraint.think``) is compiled as a top-level llguidance grammar of two:
``start: (space? START thought END space?)? @body``, where ``body`` is the request's own grammar (a JSON schema, Lark,
regex, a tool grammar) and ``thought`` is free text that cannot contain the end marker. Where the prompt opened
the block already (``Constraint.opened``) the reply begins inside it: ``start: thought END space? @body``.

Unlike vLLM, which leaves the reply unconstrained until the end marker appears (a model that never writes it is
never constrained), the thinking here is optional where the prompt did not open it: a reply that does not begin
with the start marker (after at most two whitespace characters: a model may put a line break before it, as
vLLM's and llama.cpp's parsers let it) is the body's from its first token.

A marker that is one special token (Magistral's ``[THINK]``, or an added token, which llguidance takes for a
special one) is matched by its id (``<[ID]>``), which no text can spell; free text never holds special tokens, and
the thought's pattern also leaves out the end marker spelled as text. A marker written as text is a literal, and
the thought before it a lazy lexeme: it ends at the marker's first occurrence (a greedy one that excludes the
marker could not end there: llguidance's lexer does not back up to split the marker off).

gpt-oss's harmony markers (``HARMONY``: the thinking is an ``analysis`` message, the answer a ``final`` one) make
``start: (<|channel|> "analysis" <|message|> thought <|end|> <|start|> "assistant")? <|channel|> "final" <|message|>
@body``: the model may think, then answers in the final channel, as vLLM applies a grammar to gpt-oss's final channel.
"""

from __future__ import annotations

import json
from typing import Any

#: names of the two grammars: unusual enough not to clash with a body's own
_OUTER, _BODY = "xllm_think", "xllm_body"
#: what the regex of the thought escapes (regex syntax and the Lark delimiter); ``<`` and ``>`` stay as they are
#: (escaped they are word boundaries in the regex dialect llguidance reads)
_META = set("\\.+*?()|[]{}^$/-&~#")
#: the think markers (``Constraint.think``) of a harmony reply: its header's ``<|channel|>``, its message's ``<|end|>``
HARMONY = ("<|channel|>", "<|end|>")
_HARMONY_IDS = ("<|channel|>", "<|message|>", "<|end|>", "<|start|>")


def _token(tokenizer: Any, marker: str) -> int | None:
    """The id of ``marker`` where ``tokenizer`` (llguidance's) has it as one special token, else None."""
    ids = tokenizer.tokenize_str(marker)
    return ids[0] if len(ids) == 1 and tokenizer.is_special_token(ids[0]) else None


def _escaped(marker: str) -> str:
    """``marker`` as a regex of its text, inside a Lark ``/.../``."""
    return "".join("\\" + c if c in _META else c for c in marker)


def _thinking(tokenizer: Any, end: str) -> tuple[str, list[str]]:
    """(the Lark of the thought and its end marker, the rules it needs)."""
    end_id = _token(tokenizer, end)
    if end_id is not None:
        return f"XLLM_THOUGHT <[{end_id}]>", [
            f"XLLM_THOUGHT: /(.|\\n)*/ & ~/(.|\\n)*{_escaped(end)}(.|\\n)*/"]
    return "xllm_thought", [f"xllm_thought[lazy]: /(.|\\n)*/ {json.dumps(end)}"]


def wrapped(text: str, tokenizer: Any, start: str, end: str, opened: bool) -> str:
    """Grammar ``text`` (llguidance's Lark text or top-level JSON) as the part after the thinking between ``start``
    and ``end``, for llguidance tokenizer ``tokenizer``: optional unless ``opened`` (the reply begins inside it)."""
    top = json.loads(text) if text.lstrip().startswith("{") else {"grammars": [{"lark_grammar": text}]}
    body = dict(top["grammars"][0], name=_BODY)
    thought, rules = _thinking(tokenizer, end)
    ids = [_token(tokenizer, m) for m in _HARMONY_IDS] if (start, end) == HARMONY else []
    if ids and None not in ids:
        ch, msg, _, st = (f"<[{i}]>" for i in ids)
        lark = [f"start: xllm_think? {ch} \"final\" {msg} @{_BODY}",
                f"xllm_think: {ch} \"analysis\" {msg} {thought} {st} \"assistant\"", *rules]
        return json.dumps({**top, "grammars": [{"name": _OUTER, "lark_grammar": "\n".join(lark) + "\n"}, body,
                                               *top["grammars"][1:]]})
    if opened:
        lark = [f"start: {thought} XLLM_SPACE? @{_BODY}"]
    else:
        start_id = _token(tokenizer, start)
        opening = f"<[{start_id}]>" if start_id is not None else json.dumps(start)
        # whitespace before the marker too: a model that writes a line break first was steered away from thinking
        lark = [f"start: xllm_think? @{_BODY}", f"xllm_think: XLLM_SPACE? {opening} {thought} XLLM_SPACE?"]
    # the line breaks templates put after the end marker ("\n\n", which the split drops) or a model before the start
    # one (the split drops them too); no more: a weak model
    # offered unbounded whitespace pads with it until max_tokens (as JSON_DEFAULTS keeps JSON compact)
    lark += [*rules, "XLLM_SPACE: /[ \\t\\r\\n]{1,2}/"]
    outer = {"name": _OUTER, "lark_grammar": "\n".join(lark) + "\n"}
    return json.dumps({**top, "grammars": [outer, body, *top["grammars"][1:]]})
