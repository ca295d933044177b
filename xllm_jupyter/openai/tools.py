"""Function calling, request side: validate ``tools``/``tool_choice``, shape the prompt, build grammars.

Models whose chat template knows about tools get them through the template; for the
rest (SmolLM2's template ignores them) a Hermes-style system prompt describes the
tools and asks for ``<tool_call>{...}</tool_call>`` blocks, the same format the
grammar for ``tool_choice: "required"`` or a named function forces.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any, Sequence

from ..core.errors import InvalidRequest, Unsupported
from ..core.types import ChatMessage, Constraint
from .conversation import check_name
from .schema_closing import close_objects
from .schema_errors import check_json_type, check_present_string, json_type, shown
from .schema_formats import check_strict_formats, drop_unenforced_formats
from .tool_schema import check_parameters

#: OpenAI's longest function name
MAX_NAME = 64
#: OpenAI's limit on ``tools``; it also bounds the prompt and grammar work done for a request
MAX_TOOLS = 128

#: what the fallback prompt and the grammar make the model write around each call
CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call."""

    name: str
    description: str
    parameters: dict[str, Any]
    strict: bool = False  # its schema must be enforced in full (a format the grammar cannot enforce is a 400)
    index: int = 0  # its place in the request's ``tools``, for errors

    def wire(self) -> dict[str, Any]:
        """The OpenAI tool object (what chat templates and the fallback prompt show)."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolConfig:
    """The tools of one request and how the model must use them."""

    tools: tuple[ToolSpec, ...]
    choice: str  # "none" | "auto" | "required" | "function"
    forced: str | None = None  # the function named by tool_choice
    parallel: bool = True

    @property
    def active(self) -> bool:
        """True when tools are shown to the model and its output is parsed for calls."""
        return bool(self.tools) and self.choice != "none"

    @property
    def constrained(self) -> bool:
        """True when the output is forced by grammar to be tool calls."""
        return self.active and self.choice in ("required", "function")

    @property
    def names(self) -> frozenset[str]:
        """Names of the callable functions."""
        return frozenset(t.name for t in self.tools)

    def callable_tools(self) -> tuple[ToolSpec, ...]:
        """The tools the grammar may call: only the forced one when a function is named."""
        return tuple(t for t in self.tools if self.forced is None or t.name == self.forced)


def parse_tool_config(tools: Any, tool_choice: Any, parallel: Any) -> ToolConfig:
    """Validate the request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``."""
    specs = _parse_tools(tools)
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    par = True if parallel is None else parallel
    cfg = _tool_choice(specs, tool_choice, par)
    for spec in cfg.callable_tools() if cfg.constrained else ():
        if spec.strict:  # enforced, so strict must not lose a constraint (auto ones beside a format are not refused:
            # plain auto calls are not enforced at all, and the format's answer stays possible)
            check_strict_formats(spec.parameters, f"function {spec.name!r}", f"tools[{spec.index}].function.parameters",
                                 "invalid_function_parameters")
    return cfg


def _tool_choice(specs: tuple[ToolSpec, ...], tool_choice: Any, par: bool) -> ToolConfig:
    if tool_choice is None:
        return ToolConfig(specs, "auto" if specs else "none", None, par)
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise InvalidRequest(f"Invalid value: {shown(tool_choice)}. Supported values are: 'none', 'auto', and 'required'.",
                                 param="tool_choice")
        if tool_choice == "required" and not specs:
            raise InvalidRequest("'tool_choice' is 'required' but no 'tools' were given", param="tool_choice")
        return ToolConfig(specs, tool_choice, None, par)
    if isinstance(tool_choice, dict):
        check_present_string(tool_choice.get("type"), "tool_choice.type")  # each said "tool_choice" alone
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        fn = tool_choice.get("function")
        if fn is None:
            raise InvalidRequest("Missing required parameter: 'tool_choice.function'.", param="tool_choice.function",
                                 code="missing_required_parameter")
        check_json_type(fn, ("an object",), "tool_choice.function")
        name = fn.get("name")
        check_present_string(name, "tool_choice.function.name")
        if name not in {t.name for t in specs}:
            raise InvalidRequest(f"'tool_choice' names function {shown(name)}, which is not in 'tools'", param="tool_choice")
        return ToolConfig(specs, "function", name, par)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "allowed_tools":
        mode, allowed = _allowed_tools(tool_choice.get("allowed_tools"), specs)
        # only the allowed tools are shown, parsed and (mode "required") forced: a small model shown a tool it
        # may not call calls it anyway, and that call could only be dropped
        return ToolConfig(tuple(t for t in specs if t.name in allowed), mode, None, par)
    raise InvalidRequest("'tool_choice' must be 'none', 'auto', 'required', {\"type\": \"function\", ...} or "
                         "{\"type\": \"allowed_tools\", ...}", param="tool_choice.type")


def _allowed_tools(allowed: Any, specs: Sequence[ToolSpec]) -> tuple[str, frozenset[str]]:
    """The mode and tool names of an ``allowed_tools`` tool choice, each name one of ``specs``."""
    where = "tool_choice.allowed_tools"
    if not isinstance(allowed, dict):
        raise InvalidRequest(f"Missing required parameter: '{where}'." if allowed is None else
                             f"Invalid type for '{where}': expected an object, but got {json_type(allowed)} instead.",
                             param=where, code="missing_required_parameter" if allowed is None else "invalid_type")
    mode = allowed.get("mode")
    if mode not in ("auto", "required"):
        raise InvalidRequest(f"Invalid value: {shown(mode)}. Supported values are: 'auto' and 'required'.", param=f"{where}.mode")
    tools = allowed.get("tools")
    if not isinstance(tools, list) or not tools:
        raise InvalidRequest(f"'{where}.tools' must be a non-empty array of tools", param=f"{where}.tools")
    known = {t.name for t in specs}
    names: set[str] = set()
    for i, tool in enumerate(tools):
        at = f"{where}.tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidRequest(f"Invalid value: {shown(kind)}. Supported values are: 'function'.", param=f"{at}.type")
        fn = tool.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise InvalidRequest(f"Missing required parameter: '{at}.function.name'.", param=f"{at}.function.name",
                                 code="missing_required_parameter")
        if name not in known:
            raise InvalidRequest(f"Invalid '{at}.function.name': function {shown(name)} is not in 'tools'",
                                 param=f"{at}.function.name")
        names.add(name)
    return mode, frozenset(names)


def _parse_tools(tools: Any) -> tuple[ToolSpec, ...]:
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array of tool objects", param="tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"Invalid 'tools': array too long ({len(tools)}); at most {MAX_TOOLS} tools are allowed",
                             param="tools", code="array_above_max_length")
    specs: list[ToolSpec] = []
    seen: set[str] = set()  # (one set: rebuilding it per tool was quadratic, seconds on the IOLoop)
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"Invalid type for '{where}': expected an object, but got {json_type(tool)} instead.",
                                 param=where, code="invalid_type")
        kind = tool.get("type")
        if kind is None:
            raise InvalidRequest(f"Missing required parameter: '{where}.type'.", param=f"{where}.type", code="missing_required_parameter")
        if kind == "custom":
            raise Unsupported("Custom tools are not supported by this server; use function tools", param=f"{where}.type")
        if kind != "function":
            # OpenAI's words (it also takes 'custom' tools, refused above as unsupported)
            raise InvalidRequest(f"Invalid value: {shown(kind)}. Supported values are: 'function' and 'custom'.", param=f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequest(f"{where}.function must be an object", param=f"{where}.function")
        name = fn.get("name")
        param = f"{where}.function.name"
        if name is None:
            raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
        if not isinstance(name, str):
            raise InvalidRequest(f"Invalid type for '{param}': expected a string, but got {json_type(name)} instead.",
                                 param=param, code="invalid_type")
        if len(name) > MAX_NAME:
            raise InvalidRequest(f"Invalid '{param}': string too long. Expected a string with maximum length {MAX_NAME}, but "
                                 f"got a string with length {len(name)} instead.", param=param, code="string_above_max_length")
        check_name(name, param)
        if name in seen:
            raise InvalidRequest(f"Duplicate function name {shown(name)} in 'tools'", param=f"{where}.function.name")
        seen.add(name)
        desc = fn.get("description")
        if desc is None:
            desc = ""
        elif not isinstance(desc, str):
            # (``or ""`` here turned false, 0, [] and {} into no description instead of a 400)
            raise InvalidRequest(f"Invalid type for '{where}.function.description': expected a string, but got "
                                 f"{json_type(desc)} instead.", param=f"{where}.function.description", code="invalid_type")
        strict = fn.get("strict")
        check_json_type(strict, ("a boolean",), f"{where}.function.strict")  # "yes" was taken and ignored
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        param = f"{where}.function.parameters"
        if not isinstance(params, dict):
            raise InvalidRequest(f"Invalid type for '{param}': expected an object, but got {json_type(params)} instead.",
                                 param=param, code="invalid_type")
        if params.get("type", "object") != "object":
            raise InvalidRequest(f"Invalid schema for function {shown(name)}: schema must be a JSON Schema of 'type: \"object\"', "
                                 f"got 'type: {json.dumps(params.get('type'))[:60]}'.", param=param, code="invalid_function_parameters")
        check_parameters(params, name, param)  # forced or not, as OpenAI checks it
        specs.append(ToolSpec(name, desc, params, strict is True, i))
    return tuple(specs)


# ------------------------------------------------------------------------ prompt
def template_supports_tools(template: str | None) -> bool:
    """True when the chat template renders ``tools`` itself (Qwen, Llama 3.1, Mistral, Hermes)."""
    return bool(template) and "tools" in template  # type: ignore[operator]


def prepare_messages(
    messages: Sequence[ChatMessage], cfg: ToolConfig, native: bool
) -> tuple[list[ChatMessage], list[dict[str, Any]] | None]:
    """Messages and the ``tools`` argument for the chat template.

    A native template gets the tools and the history as-is (arguments as objects, as
    templates expect); otherwise tool calls and results become plain text in the
    Hermes format and a system prompt describes the tools.
    """
    if native:
        tools = [t.wire() for t in cfg.tools] if cfg.active else None
        return [_with_object_arguments(m) for m in messages], tools
    out: list[ChatMessage] = []
    for i, m in enumerate(messages):
        if m.role == "tool" and i and messages[i - 1].role == "tool":
            # one user turn holds a turn's results, as Qwen's template groups them: templates that want user and
            # assistant turns to alternate (Gemma's) refused two in a row
            out[-1] = replace(out[-1], content=f"{out[-1].content}\n{_as_text(m).content}")
        else:
            out.append(_as_text(m))
    if cfg.active:
        prompt = fallback_system_prompt(cfg)
        if out and out[0].role in ("system", "developer"):
            out[0] = ChatMessage(role=out[0].role, content=(out[0].content or "") + "\n\n" + prompt)
        else:
            out.insert(0, ChatMessage(role="system", content=prompt))
    return out, None


def nine_char_ids(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """``messages`` with each tool call's id, and the ``tool_call_id`` answering it, made 9 letters or digits.

    Mistral's chat templates refuse any other id (they raise "Tool call IDs should be alphanumeric strings with
    length 9!"), and OpenAI's ``call_...`` ids, this server's own among them, are longer: every turn after a call was
    a 400. Each id maps to the same short one wherever it appears, so results still pair with their calls."""
    def short(cid: Any) -> Any:
        if isinstance(cid, str) and len(cid) == 9 and cid.isascii() and cid.isalnum():
            return cid
        return hashlib.sha256(str(cid).encode("utf-8")).hexdigest()[:9]

    out = []
    for m in messages:
        if m.tool_calls:
            m = replace(m, tool_calls=[{**c, "id": short(c.get("id"))} for c in m.tool_calls])
        if m.tool_call_id is not None:
            m = replace(m, tool_call_id=short(m.tool_call_id))
        out.append(m)
    return out


def one_call_per_turn(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """``messages`` with each assistant turn of several tool calls split into one turn per call, each followed by its
    result(s): Llama 3.x templates refuse a message of several calls ("This model only supports single tool-calls at
    once!"), so a reply of parallel calls, this server's own included, made the next request a 400."""
    out: list[ChatMessage] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        end = i + 1
        while end < len(messages) and messages[end].role == "tool":
            end += 1
        if m.role != "assistant" or not m.tool_calls or len(m.tool_calls) < 2:
            out.append(m)
            i += 1
            continue
        results = list(messages[i + 1:end])
        for k, call in enumerate(m.tool_calls):
            first = k == 0  # the turn's text and thinking came before all its calls: shown once, with the first
            out.append(replace(m, content=m.content if first else None,
                               reasoning_content=m.reasoning_content if first else None, tool_calls=[call]))
            out.extend(r for r in results if r.tool_call_id == call.get("id"))
        ids = {c.get("id") for c in m.tool_calls}
        out.extend(r for r in results if r.tool_call_id not in ids)  # (answering no call of the turn: kept, last)
        i = end
    return out


def fallback_system_prompt(cfg: ToolConfig) -> str:
    """A Hermes-style description of the tools for templates that ignore ``tools``."""
    lines = "\n".join(json.dumps(t.wire(), ensure_ascii=False) for t in cfg.tools)
    text = (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )
    if cfg.forced:
        text += f"\n\nYou must call the function {cfg.forced!r}."
    elif cfg.choice == "required":
        text += "\n\nYou must call at least one function."
    if not cfg.parallel:
        text += " Call at most one function."
    return text


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except (ValueError, RecursionError):
            return arguments
    return arguments


def _with_object_arguments(m: ChatMessage) -> ChatMessage:
    if not m.tool_calls:
        return m
    calls = []
    for c in m.tool_calls:
        fn = dict(c.get("function") or {})
        fn["arguments"] = _arguments_object(fn.get("arguments", {}))
        calls.append({**c, "function": fn})
    return replace(m, tool_calls=calls)


def format_call(name: str, arguments: Any) -> str:
    """One call in the Hermes text format (what the grammar forces and history shows)."""
    body = json.dumps({"name": name, "arguments": _arguments_object(arguments)}, ensure_ascii=False)
    return CALL_OPEN + body + CALL_CLOSE


def _as_text(m: ChatMessage) -> ChatMessage:
    if m.role == "tool":
        return ChatMessage(role="user", content=f"<tool_response>\n{m.content or ''}\n</tool_response>")
    if m.role == "assistant" and m.tool_calls:
        calls = [format_call((c.get("function") or {}).get("name", ""), (c.get("function") or {}).get("arguments", {}))
                 for c in m.tool_calls]
        text = "\n".join(([m.content] if m.content else []) + calls)
        return ChatMessage(role="assistant", content=text, name=m.name, reasoning_content=m.reasoning_content)
    return m


# ----------------------------------------------------------------------- grammar
def _lark_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def args_schema(params: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema a forced call's ``arguments`` are decoded with: ``params`` closed, whitespace fixed."""
    # invented extra arguments would run a small model to max_tokens; a format the grammar cannot enforce (strict
    # tools with one were refused) constrains nothing beyond its type, as at api.openai.com
    schema = close_objects(drop_unenforced_formats(params))
    # a call's arguments are an object (only those make a call unforced: tool_call.py; clients pass them as keyword
    # arguments), also where the schema names no type (``{}``, properties alone): it let the grammar write any JSON
    schema.setdefault("type", "object")
    # Compact, fixed whitespace: a free choice lets a weak model emit blanks forever.
    guidance = dict(schema.get("x-guidance") or {})
    guidance.setdefault("whitespace_flexible", False)
    schema["x-guidance"] = guidance
    return schema


#: the most calls one forced (``required``) reply may hold with parallel_tool_calls
MAX_PARALLEL_CALLS = 8


def max_forced_calls(cfg: ToolConfig) -> int:
    """How many calls a grammar-forced reply may hold: one for a named function or without parallel calls."""
    return MAX_PARALLEL_CALLS if cfg.parallel and cfg.forced is None else 1


def tool_grammar(cfg: ToolConfig, answer: Any = None) -> str:
    """A Lark grammar (llguidance dialect) that admits only valid Hermes tool-call blocks (or, given ``answer``, a
    JSON schema, an answer that matches it instead)."""
    tools = cfg.callable_tools()
    rules = []
    for i, t in enumerate(tools):
        head = _lark_str('{"name": ' + json.dumps(t.name) + ', "arguments": ')
        rules.append(f"fn_{i}: {head} %json{json.dumps(args_schema(t.parameters))} \"}}\"")
    alts = " | ".join(f"fn_{i}" for i in range(len(tools)))
    # Bounded: after a call the grammar allows either the end or another call, and small models
    # tend to repeat the same call until max_tokens (finish "length", which the SDK's parse()
    # rejects). A named function is one call, as OpenAI makes it.
    calls = max_forced_calls(cfg)
    start = f'call ("\\n" call){{0,{calls - 1}}}' if calls > 1 else "call"
    start = "start: " + (start if answer is None else f"({start}) | %json{json.dumps(answer)}")
    # each marker a literal of its own: the grammar compiler lets a vocabulary's marker token write it too
    call = f'call: {_lark_str(CALL_OPEN.strip())} "\\n" ({alts}) "\\n" {_lark_str(CALL_CLOSE.strip())}'
    return "\n".join([start, call, *rules]) + "\n"


def tool_constraint(cfg: ToolConfig) -> Constraint | None:
    """The decoding constraint for ``required``/named tool choice; None when the model chooses freely."""
    return Constraint(kind="lark", spec=tool_grammar(cfg)) if cfg.constrained else None


def calls_or_answer(cfg: ToolConfig, answer: Constraint | None, hermes: bool) -> Constraint | None:
    """``answer`` (a ``response_format``'s constraint), widened to admit tool calls too when the model may call tools.

    OpenAI's model may call a tool or answer in the format (agents with tools and a structured final output:
    pydantic-ai, openai-agents, dspy); the format's grammar alone ruled calls out. Calls are the Hermes blocks the
    grammar knows, so a template asking for another family of call markup keeps the format alone.
    """
    if answer is None or not (cfg.active and hermes) or cfg.constrained or answer.kind not in ("json_object", "json_schema"):
        return answer
    return Constraint(kind="lark", spec=tool_grammar(cfg, answer_schema(answer)))


def answer_schema(answer: Constraint) -> Any:
    """The JSON schema of a ``json_schema``/``json_object`` format beside tool calls, compact as the format alone is
    (a weak model pads with blanks otherwise)."""
    schema = json.loads(answer.spec) if answer.kind == "json_schema" else {"type": "object"}
    if isinstance(schema, dict):
        schema = {**schema, "x-guidance": {**(schema.get("x-guidance") or {}), "whitespace_flexible": False}}
    return schema
