"""Responses API items: input normalization, and items <-> chat wire messages.

Items are kept in their Responses shape (with ids) for ``input_items`` and the
response ``output``; the chat path sees them as messages: text messages as they are,
``function_call`` items as an assistant message with ``tool_calls``, and
``function_call_output`` items as ``tool`` messages.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from ..core.errors import InvalidRequest, Unsupported
from .conversation import Turn, check_cache_breakpoint, find_tool_turn_problem, part_text, responses_tool_turn_error
from .schema_errors import check_json_type, check_present_string, json_type, shown

ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")
_MEDIA_PARTS = ("input_image", "input_file", "input_audio")


def new_id(prefix: str) -> str:
    """A fresh OpenAI-style id such as ``msg_<hex>``: 128 random bits from the OS's CSPRNG, so unique and unguessable
    where it is a handle (``resp_``)."""
    # token_hex rather than uuid4().hex: the same source, ~4x cheaper (1.2 vs 4.7 us; one per input item)
    return prefix + secrets.token_hex(16)


def _text(content: Any, param: str) -> str:
    """A string, or text parts joined; media parts are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest("'content' must be a string or a list of content parts", param=param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS:
            texts.append(part_text(part, "text", f"{param}[{j}].text"))
            check_cache_breakpoint(part.get("prompt_cache_breakpoint"), f"{param}[{j}].prompt_cache_breakpoint")
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in _MEDIA_PARTS:
            raise Unsupported(f"Content parts of type '{kind}' are not supported by this model", param=f"{param}[{j}].type")
        else:
            raise InvalidRequest(f"Unknown content part type {shown(kind)}", param=f"{param}[{j}].type")
    return "\n".join(texts)


def _str_field(item: dict[str, Any], name: str, param: str) -> str:
    value = item.get(name)
    if value is None:
        raise InvalidRequest(f"Missing required parameter: '{param}.{name}'.", param=f"{param}.{name}", code="missing_required_parameter")
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string", param=f"{param}.{name}")
    return value


def message_item(role: str, text: str, mid: str | None = None, status: str = "completed",
                 logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A message item; assistant text is ``output_text`` (with its tokens' ``logprobs`` when asked for), everything
    else ``input_text``."""
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []} if role == "assistant" else {"type": "input_text", "text": text}
    if logprobs is not None and role == "assistant":
        part["logprobs"] = logprobs
    return {"id": mid or new_id("msg_"), "type": "message", "role": role, "status": status, "content": [part]}


def reasoning_item(text: str, rid: str | None = None, status: str = "completed") -> dict[str, Any]:
    """A ``reasoning`` item: a reasoning model's thinking as its ``reasoning_text`` content (no summary is made)."""
    return {"id": rid or new_id("rs_"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def function_call_item(call_id: str, name: str, arguments: str, fid: str | None = None, status: str = "completed") -> dict[str, Any]:
    """A ``function_call`` item."""
    return {"id": fid or new_id("fc_"), "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def _item_id(item: dict[str, Any], param: str, seen: set[str]) -> str | None:
    """The client's id for an input item (None: the server makes one); a 400 unless a string not used before in
    this input (``input_items`` pages by id: a repeated one made the SDK's auto-pagination loop forever)."""
    iid = item.get("id")
    if iid is None:
        return None
    if not isinstance(iid, str):
        raise InvalidRequest(f"Invalid type for '{param}.id': expected a string, but got {json_type(iid)} instead.",
                             param=f"{param}.id", code="invalid_type")
    if iid in seen:
        raise duplicate_item(iid, param)
    seen.add(iid)
    return iid


def duplicate_item(iid: str, param: str) -> InvalidRequest:
    """The 400 for an input item whose id an earlier item has (in this input, or in the stored conversation)."""
    return InvalidRequest(f"Duplicate item found with id {shown(iid)}. Remove duplicate items from your input and try "
                          "again.", param=f"{param}.id")


def check_items_new(items: list[dict[str, Any]], taken: set[str]) -> None:
    """400 when an input item has the id of an item of the stored conversation it continues (``taken``): it was sent
    again with ``previous_response_id``, which puts that conversation in front already."""
    for i, item in enumerate(items):
        if item["id"] in taken:
            raise duplicate_item(item["id"], f"input[{i}]")


def normalize_input(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as stored and listed by ``input_items``: every item with an id."""
    if isinstance(value, str):
        return [message_item("user", value)]
    items = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        param = f"input[{i}]"
        kind = item.get("type")
        kind = "message" if kind is None else kind  # null as absent: an SDK message type dumped with its None fields
        check_json_type(kind, ("a string",), f"{param}.type")
        iid = _item_id(item, param, seen)
        if kind == "message":
            role = item.get("role")
            check_present_string(role, f"{param}.role")
            if role not in ROLES:
                supported = ", ".join(repr(r) for r in ROLES[:-1]) + f", and {ROLES[-1]!r}"
                raise InvalidRequest(f"Invalid value: {shown(role)}. Supported values are: {supported}.", param=f"{param}.role")
            items.append(message_item(role, _text(item.get("content"), f"{param}.content"), iid))
        elif kind == "function_call":
            args = (_str_field(item, k, param) for k in ("call_id", "name", "arguments"))
            items.append(function_call_item(*args, fid=iid))
        elif kind == "function_call_output":
            call_id = _str_field(item, "call_id", param)
            output = _text(item.get("output"), f"{param}.output")
            items.append({"id": iid or new_id("fco_"), "type": "function_call_output", "call_id": call_id, "output": output, "status": "completed"})
        elif kind == "reasoning":  # an earlier reply's thinking sent back, as clients send a whole output
            items.append(_reasoning_input(item, iid, param))
        else:
            raise Unsupported(f"Input items of type {shown(kind)} are not supported by this server yet", param=f"{param}.type")
    return items


def _reasoning_input(item: dict[str, Any], iid: str | None, param: str) -> dict[str, Any]:
    """A ``reasoning`` input item as stored: its summary and content texts (``items_to_messages`` gives them to the
    assistant turn after it)."""
    parts = {}
    for key in ("summary", "content"):
        value = item.get(key)
        check_json_type(value, ("an array",), f"{param}.{key}")
        parts[key] = [{"type": p.get("type"), "text": _str_field(p, "text", f"{param}.{key}[{i}]")}
                      for i, p in enumerate(value or ()) if isinstance(p, dict)]
    return {"id": iid or new_id("rs_"), "type": "reasoning", **parts, "status": "completed"}


def _thinking(item: dict[str, Any]) -> str | None:
    """A reasoning item's thinking: its ``content`` texts, else (api.openai.com's items carry none) its summary's, as
    vLLM reads it; None where it has neither."""
    content, summary = item.get("content") or (), item.get("summary") or ()
    return "".join(p["text"] for p in content) if content else "\n\n".join(p["text"] for p in summary) or None


def items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat wire messages for normalized items; consecutive function calls share one assistant turn, and a reasoning
    item's thinking is the ``reasoning_content`` of the assistant turn right after it (dropped before any other), as a
    chat client sends it back (conversation.sent_thinking): chat templates that show past thinking render it."""
    out: list[dict[str, Any]] = []
    thought: str | None = None  # of the reasoning items since the last turn
    for item in items:
        kind = item["type"]
        if kind == "reasoning":
            more = _thinking(item)
            thought = more if thought is None else "\n\n".join(filter(None, (thought, more)))
            continue
        if kind == "message":
            out.append({"role": item["role"], "content": "".join(p.get("text", "") for p in item["content"])})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        if thought is not None and out and out[-1]["role"] == "assistant":
            prior = out[-1].get("reasoning_content")  # (a reasoning item between two calls of one turn)
            out[-1]["reasoning_content"] = thought if prior is None else f"{prior}\n\n{thought}"
        thought = None
    return out


def check_function_outputs(messages: list[dict[str, Any]]) -> None:
    """400 (in the Responses API's words) unless every function call of the conversation, stored turns
    included, has its output right after it and every output answers such a call."""
    turns = (Turn(m["role"], tuple(c["id"] for c in m.get("tool_calls") or ()), m.get("tool_call_id")) for m in messages)
    problem = find_tool_turn_problem(turns)
    if problem is not None:
        raise responses_tool_turn_error(problem)


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses function tools (flat) as chat tools (nested under ``function``)."""
    out = []
    for i, tool in enumerate(tools):
        check_present_string(tool.get("type"), f"tools[{i}].type")
        if tool.get("type") != "function":
            raise Unsupported(f"Tools of type {shown(tool.get('type'))} are not supported by this server", param=f"tools[{i}].type")
        if "name" not in tool and isinstance(tool.get("function"), dict):
            # chat's nested shape, e.g. openai.pydantic_function_tool() passed to responses.create (parse converts it)
            raise InvalidRequest(f"Missing required parameter: 'tools[{i}].name'. Responses API function tools are flat "
                                 "({\"type\": \"function\", \"name\", \"parameters\"}); this one is in chat's shape, "
                                 "nested under 'function'.", param=f"tools[{i}].name", code="missing_required_parameter")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    """Responses ``tool_choice`` in chat's shape."""
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice.get("type") == "function":
        # chat's nested shape ({"function": {"name": ...}}) sent here: say what is missing, not "unsupported"
        raise InvalidRequest("Missing required parameter: 'tool_choice.name'.", param="tool_choice.name",
                             code="missing_required_parameter")
    if choice.get("type") == "allowed_tools":
        # flat here ({"type", "mode", "tools": [{"type": "function", "name"}]}), nested under allowed_tools in chat
        tools = choice.get("tools")
        if isinstance(tools, list):
            tools = [{"type": t.get("type"), "function": {k: t[k] for k in ("name",) if k in t}}
                     if isinstance(t, dict) else t for t in tools]
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice.get("mode"), "tools": tools}}
    check_present_string(choice.get("type"), "tool_choice.type")
    raise Unsupported(f"tool_choice of type {shown(choice.get('type'))} is not supported by this server", param="tool_choice")


def response_status(finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    """A Response's ``status`` and ``incomplete_details`` for its chat reply's ``finish_reason``."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def last_item_status(item: dict[str, Any], status: str) -> str:
    """The status of a reply's last item when the reply ended with ``status``: a cut reply (``incomplete``) was cut
    inside it, unless it is a call whose arguments are complete JSON (the cut came after it). A call whose arguments
    are not is ``incomplete`` whatever the reply's status: a stop string (an xllm extension here) cut a forced call,
    and the reply, ended by the client's own stop, is ``completed``."""
    if item["type"] == "function_call":
        try:
            json.loads(item["arguments"])
        except ValueError:
            return "incomplete"
        return "completed"
    return status
