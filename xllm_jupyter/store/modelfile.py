"""Ollama's Modelfile: parse it into a typed ``Modelfile``, and render one back to text.

Grammar (as Ollama documents it): one instruction per line, names case-insensitive,
``#`` starts a comment line, a value is the rest of the line, a ``"quoted"`` string
(escapes ``\\" \\\\ \\n \\t \\uXXXX``) or a ``\"\"\"triple-quoted\"\"\"`` string that may span lines.
``parse_modelfile(render_modelfile(m)) == m`` holds for every parsed ``m``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any, Callable, Mapping

from ..core.errors import InvalidRequest

ROLES = ("system", "user", "assistant")
#: control characters other than newline and tab: written ``\\uXXXX`` in a quoted string
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CODE_ESCAPE = re.compile(r"u[0-9a-fA-F]{4}")


def did_you_mean(word: str, known: Any, *, upper: bool = False) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` to a misspelt ``word``, else ``""``."""
    close = get_close_matches(word, list(known), n=1)
    return f" (did you mean {(close[0].upper() if upper else close[0])!r}?)" if close else ""
#: (``requires``, the least Ollama version a Modelfile needs, is read and ignored: it means nothing to xllm)
INSTRUCTIONS = ("from", "parameter", "template", "system", "adapter", "license", "message", "requires")


class ModelfileError(InvalidRequest):
    """A Modelfile that does not parse; the message names the line."""

    code = "invalid_modelfile"

    def __init__(self, message: str, line: int | None = None):
        super().__init__(f"line {line}: {message}" if line is not None else message, param="modelfile")
        self.line = line


def _number(lo: float | None = None, hi: float | None = None) -> Callable[[str], float]:
    def conv(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("expects a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("expects a number")
        _check_range(value, lo, hi)
        return value

    return conv


def _integer(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    def conv(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError("expects an integer") from None
        _check_range(value, lo, hi)
        return value

    return conv


def _check_range(value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise ValueError(f"must be between {lo:g} and {hi:g}")
    if lo is not None and value < lo:
        raise ValueError(f"must be at least {lo:g}")
    if hi is not None and value > hi:
        raise ValueError(f"must be at most {hi:g}")


def _boolean(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError("expects true or false")


def _string(text: str) -> str:
    if not text:
        raise ValueError("expects a non-empty string")
    return text


#: Ollama's documented parameters and their types; ``stop`` is the one list-valued one
PARAMETERS: dict[str, Callable[[str], Any]] = {
    "temperature": _number(0),
    "top_p": _number(0, 1),
    "top_k": _integer(-1),  # -1: off, as vLLM spells it (the API takes it too)
    "min_p": _number(0, 1),
    "typical_p": _number(0, 1),
    "num_ctx": _integer(1),
    "num_predict": _integer(-2),
    "num_keep": _integer(-1),
    "repeat_penalty": _number(0),
    "repeat_last_n": _integer(-1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "penalize_newline": _boolean,
    "seed": _integer(),
    "stop": _string,
    "mirostat": _integer(0, 2),
    "mirostat_eta": _number(0),
    "mirostat_tau": _number(0),
    "num_batch": _integer(1),
    "num_gpu": _integer(-1),
    "main_gpu": _integer(0),
    "num_thread": _integer(0),
    "use_mmap": _boolean,
}

#: parameters kept in the manifest (and ``xllm show``) that no xllm sampler or setting uses
RECORDED_ONLY = frozenset({"typical_p", "num_keep", "repeat_last_n", "penalize_newline", "mirostat", "mirostat_eta",
                           "mirostat_tau", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap"})


@dataclass
class Message:
    """One MESSAGE line: a few-shot turn prepended to every chat."""

    role: str
    content: str


@dataclass
class Modelfile:
    """A parsed Modelfile; ``parameters`` holds typed values (``stop`` is a list)."""

    from_: str
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    adapters: list[str] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form a manifest records under ``modelfile``."""
        return {
            "from": self.from_,
            "parameters": {k: list(v) if isinstance(v, list) else v for k, v in self.parameters.items()},
            "template": self.template,
            "system": self.system,
            "adapters": list(self.adapters),
            "license": list(self.license),
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Modelfile":
        """The inverse of ``to_dict`` (values re-validated: a manifest is read from disk)."""
        params: dict[str, Any] = {}
        for k, v in dict(data.get("parameters") or {}).items():
            if k not in PARAMETERS:
                continue  # a parameter a newer xllm knew: drop it rather than fail the model
            values = v if isinstance(v, list) else [v]
            parsed = [PARAMETERS[k](str(x).lower() if isinstance(x, bool) else str(x)) for x in values]
            params[k] = parsed if k == "stop" else parsed[0]
        messages = [Message(str(m["role"]), str(m["content"])) for m in _list(data, "messages")]
        if any(m.role not in ROLES for m in messages):
            raise ValueError("MESSAGE role")  # the server would send the model a role its template does not know
        return cls(
            from_=str(data.get("from") or ""),
            parameters=params,
            template=data.get("template") if isinstance(data.get("template"), str) else None,
            system=data.get("system") if isinstance(data.get("system"), str) else None,
            adapters=[str(a) for a in _list(data, "adapters")],
            license=[str(x) for x in _list(data, "license")],
            messages=messages,
        )


def _list(data: Mapping[str, Any], key: str) -> list[Any]:
    """``data[key]`` as a list (absent: empty); ValueError for any other type (a string would split into letters)."""
    value = data.get(key) or []
    if not isinstance(value, list):
        raise ValueError(key)
    return value


class _Reader:
    """A cursor over the text that knows its line number."""

    def __init__(self, text: str):
        # a byte-order mark (Windows editors save "UTF-8 with BOM") is not part of the first instruction
        self.text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        self.pos = 0
        self.line = 1

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def advance(self, n: int = 1) -> str:
        chunk = self.text[self.pos : self.pos + n]
        self.line += chunk.count("\n")
        self.pos += len(chunk)
        return chunk

    def skip_blank(self) -> None:
        """Skip spaces and tabs (not newlines)."""
        while self.peek() in (" ", "\t") and self.peek():
            self.advance()

    def rest_of_line(self) -> str:
        end = self.text.find("\n", self.pos)
        end = len(self.text) if end < 0 else end
        return self.advance(end - self.pos)

    def word(self) -> str:
        start = self.pos
        while self.peek() and not self.peek().isspace():
            self.advance()
        return self.text[start : self.pos]

    def value(self, what: str) -> str:
        """A plain, quoted or triple-quoted value ending its line."""
        self.skip_blank()
        line = self.line
        if self.peek(3) == '"""':
            self.advance(3)
            end = self.text.find('"""', self.pos)
            if end < 0:
                raise ModelfileError(f'{what}: unterminated """ string', line)
            value = self.advance(end - self.pos)
            self.advance(3)
            self._end_of_line(what)
            return value
        if self.peek() == '"':
            self.advance()
            out = []
            escapes = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}
            while True:
                ch = self.peek()
                if ch in ("", "\n"):
                    raise ModelfileError(f'{what}: unterminated " string', line)
                self.advance()
                if ch == '"':
                    break
                if ch == "\\" and self.peek() in escapes:
                    out.append(escapes[self.advance()])
                elif ch == "\\" and _CODE_ESCAPE.fullmatch(self.peek(5)):
                    # \u000d: a control character (a "\r" stop string), as ``quoted`` writes it
                    code = int(self.advance(5)[1:], 16)
                    if 0xD800 <= code <= 0xDFFF:
                        raise ModelfileError(f"{what}: \\u{code:04x} is half of a surrogate pair, not a character",
                                             line)
                    out.append(chr(code))
                else:
                    out.append(ch)
            self._end_of_line(what)
            return "".join(out)
        return self.rest_of_line().strip()

    def _end_of_line(self, what: str) -> None:
        line = self.line
        if self.rest_of_line().strip():
            raise ModelfileError(f"{what}: unexpected text after the closing quote", line)


def parse_modelfile(text: str) -> Modelfile:
    """Parse Modelfile ``text``; ModelfileError (with the line number) when it is invalid."""
    r = _Reader(text)
    from_: tuple[str, int] | None = None
    m = Modelfile(from_="")
    while r.pos < len(r.text):
        r.skip_blank()
        if r.peek() == "\n":
            r.advance()
            continue
        if r.peek() == "#":
            r.rest_of_line()
            continue
        line = r.line
        raw = r.word()
        name = raw.lower()
        if name not in INSTRUCTIONS:
            raise ModelfileError(f"unknown instruction {raw[:40]!r}{did_you_mean(name, INSTRUCTIONS, upper=True)}", line)
        upper = name.upper()
        if name == "parameter":
            r.skip_blank()
            pname = r.word()
            if not pname:
                raise ModelfileError("PARAMETER needs a name and a value", line)
            key = pname.lower()
            if key not in PARAMETERS:
                raise ModelfileError(f"unknown parameter {pname[:40]!r}{did_you_mean(key, PARAMETERS)}", line)
            raw_value = r.value(f"PARAMETER {key}")
            if not raw_value:
                raise ModelfileError(f"PARAMETER {key} needs a value", line)
            try:
                value = PARAMETERS[key](raw_value)
            except ValueError as exc:
                raise ModelfileError(f"PARAMETER {key} {exc}", line) from None
            if key == "stop":
                m.parameters.setdefault("stop", []).append(value)
            else:
                m.parameters[key] = value
            continue
        if name == "message":
            r.skip_blank()
            role = r.word().lower()
            if role not in ROLES:
                raise ModelfileError(f"MESSAGE role must be one of {', '.join(ROLES)}", line)
            m.messages.append(Message(role, r.value("MESSAGE").strip()))
            continue
        value = r.value(upper)
        if name in ("template", "license"):
            if not value.strip():
                raise ModelfileError(f"{upper} needs a value", line)
        else:
            value = value.strip()  # surrounding newlines of a """ block are layout, not content
            if not value:
                raise ModelfileError(f"{upper} needs a value", line)
        if name == "from":
            if from_ is not None:
                raise ModelfileError(f"FROM given twice (first on line {from_[1]})", line)
            from_ = (value, line)
            m.from_ = value
        elif name == "template":
            m.template = value
        elif name == "system":
            m.system = value
        elif name == "adapter":
            m.adapters.append(value)
        elif name == "license":
            m.license.append(value)
    if from_ is None:
        raise ModelfileError("missing FROM: a Modelfile must name its base model")
    return m


def quoted(value: str) -> str:
    """``value`` as a ``"quoted"`` Modelfile string: ``\\ \" \\n \\t`` escaped, other control characters as ``\\uXXXX``.

    A raw carriage return would end the line when the file is read back (and a terminal would act on
    the others); ``xllm show --parameters`` prints stop strings this way too, so its output reads back.
    """
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return '"' + _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'


def _quote(value: str) -> str:
    """The shortest spelling of ``value`` that parses back to exactly it."""
    if _CONTROL.search(value):
        return quoted(value)
    plain = value == value.strip() and value and "\n" not in value and not value.startswith('"')
    if plain:
        return value
    if '"""' not in value and not value.endswith('"'):
        return f'"""{value}"""'
    return quoted(value)


def _format_param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    return _quote(str(value))


def render_modelfile(m: Modelfile) -> str:
    """Modelfile text for ``m``; parsing it gives back an equal ``Modelfile``."""
    lines = [f"FROM {_quote(m.from_)}"]
    for key, value in m.parameters.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {_format_param(v)}")
    if m.template is not None:
        lines.append(f"TEMPLATE {_quote(m.template)}")
    if m.system is not None:
        lines.append(f"SYSTEM {_quote(m.system)}")
    lines += [f"ADAPTER {_quote(a)}" for a in m.adapters]
    lines += [f"LICENSE {_quote(x)}" for x in m.license]
    lines += [f"MESSAGE {msg.role} {_quote(msg.content)}" for msg in m.messages]
    return "\n".join(lines) + "\n"
