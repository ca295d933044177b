"""The checks of client_walk.py: one function per library, each the paths its docs show users.

Text that matters uses ``smollm2``; wire shapes that do not use ``tiny``. Tool calls are forced
(``tool_choice`` required or named, which the server's grammar turns into a parsed call) and one call
per reply (``parallel_tool_calls`` false), so a lost call is the wire's fault, not the 135M model's.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from typing import Any, Callable, Optional

from pydantic import BaseModel

from client_walk import Verdict, Walk

CHAT, FAST, EMBED = "smollm2", "tiny", "all-minilm"
WEATHER_Q = "What's the weather in Paris?"
PERSON_Q = "Bob is 32 years old. Extract the person."
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


class Person(BaseModel):
    """The structured-output target."""

    name: str
    age: int
    nickname: Optional[str] = None


def get_weather(city: str) -> str:
    """Get the weather for a city."""
    return f"sunny in {city}"


def importable(walk: Walk, library: str, *modules: str) -> bool:
    """True when every module imports; else the library is recorded as SKIP."""
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as exc:  # noqa: BLE001 - an ImportError or a broken install alike
            walk.skip_library(library, f"{m} does not import: {type(exc).__name__}: {exc}")
            return False
    return True


def expect(ok: Any, detail: Any) -> Any:
    """``detail`` when ``ok``, else an AssertionError carrying it."""
    if not ok:
        raise AssertionError(f"unexpected: {str(detail)[:300]}")
    return detail


def person(p: Any) -> Any:
    """A parsed Person-like result (wire fine: types right; the model's values are not judged)."""
    return expect(isinstance(getattr(p, "name", None), str) and isinstance(getattr(p, "age", None), int), p)


def arun(coro_fn: Callable[[], Any]) -> Callable[[], Any]:
    """A check that runs the coroutine function on a fresh event loop (clients made inside it)."""
    return lambda: asyncio.run(coro_fn())


# ---------------------------------------------------------------------------------------------- openai
def openai_checks(w: Walk) -> None:
    """The official SDK: the baseline every other library builds on."""
    if not importable(w, "openai", "openai"):
        return
    import openai

    c = openai.OpenAI(base_url=w.base_url, api_key=w.api_key, max_retries=0, timeout=300)
    msg = [{"role": "user", "content": "Say hi"}]
    w.check("openai", "chat", lambda: expect(c.chat.completions.create(model=CHAT, messages=msg, max_tokens=20).choices[0].message.content, "text"))

    def stream_usage():
        chunks = list(c.chat.completions.create(model=FAST, messages=msg, max_tokens=5, stream=True, stream_options={"include_usage": True}))
        last = chunks[-1]
        return expect(last.choices == [] and last.usage.completion_tokens == 5 and all(ch.usage is None for ch in chunks[:-1]), last.usage)
    w.check("openai", "stream include_usage", stream_usage)

    async def achat():
        async with openai.AsyncOpenAI(base_url=w.base_url, api_key=w.api_key, max_retries=0) as ac:
            return (await ac.chat.completions.create(model=FAST, messages=msg, max_tokens=3)).usage.completion_tokens
    w.check("openai", "async chat", arun(achat))

    def n_logprobs():
        r = c.chat.completions.create(model=FAST, messages=msg, max_tokens=3, n=2, logprobs=True, top_logprobs=2)
        lp = r.choices[1].logprobs.content
        return expect(len(r.choices) == 2 and len(lp) == 3 and len(lp[0].top_logprobs) == 2, (len(r.choices), lp[0]))
    w.check("openai", "n=2 + logprobs", n_logprobs)

    def tools():
        q = [{"role": "user", "content": WEATHER_Q}]
        r = c.chat.completions.create(model=CHAT, messages=q, tools=[TOOL], tool_choice="required", parallel_tool_calls=False, max_tokens=60)
        m = r.choices[0].message
        call = m.tool_calls[0]
        expect(r.choices[0].finish_reason == "tool_calls" and "city" in json.loads(call.function.arguments), m)
        q += [m.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        return c.chat.completions.create(model=CHAT, messages=q, tools=[TOOL], max_tokens=30).choices[0].message.content
    w.check("openai", "tools required + tool result", tools)
    w.check("openai", "chat.completions.parse", lambda: person(c.chat.completions.parse(
        model=CHAT, messages=[{"role": "user", "content": PERSON_Q}], response_format=Person, max_tokens=60).choices[0].message.parsed))
    w.check("openai", "responses.create", lambda: expect(c.responses.create(model=FAST, input="hi", max_output_tokens=5).output_text, "text"))
    w.check("openai", "embeddings (base64 default)", lambda: expect(len(c.embeddings.create(model=EMBED, input=["a", "b"]).data[1].embedding) == 384, 384))


# ------------------------------------------------------------------------------------------- langchain
def langchain_checks(w: Walk) -> None:
    """langchain-openai: ChatOpenAI (chat completions and Responses), OpenAIEmbeddings, the legacy OpenAI LLM."""
    if not importable(w, "langchain", "langchain_openai", "langchain_core"):
        return
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI, OpenAI, OpenAIEmbeddings

    common = dict(base_url=w.base_url, api_key=w.api_key, max_retries=0)
    llm = ChatOpenAI(model=CHAT, max_tokens=60, **common)
    weather = tool(get_weather)
    w.check("langchain", "invoke", lambda: expect(llm.invoke("Say hi").content, "text"))
    w.check("langchain", "stream", lambda: expect("".join(ch.content for ch in llm.stream("Say hi")), "text"))
    w.check("langchain", "ainvoke", arun(lambda: ChatOpenAI(model=FAST, max_tokens=3, **common).ainvoke("hi")))
    w.check("langchain", "stream_usage", lambda: expect([ch.usage_metadata for ch in ChatOpenAI(
        model=FAST, max_tokens=3, stream_usage=True, **common).stream("hi") if ch.usage_metadata][-1]["output_tokens"] == 3, "usage"))
    w.check("langchain", "n=2", lambda: expect(len(ChatOpenAI(model=FAST, max_tokens=3, n=2, **common).generate(
        [[HumanMessage("hi")]]).generations[0]) == 2, 2))
    w.check("langchain", "logprobs", lambda: expect(ChatOpenAI(model=FAST, max_tokens=3, logprobs=True, **common).invoke(
        "hi").response_metadata["logprobs"]["content"][0]["logprob"] < 0, "logprob"))

    def tool_round_trip(model: Any) -> Any:
        bound = model.bind_tools([weather], tool_choice="get_weather", parallel_tool_calls=False)
        ai = bound.invoke([HumanMessage(WEATHER_Q)])
        expect(len(ai.tool_calls) == 1 and isinstance(ai.tool_calls[0]["args"].get("city"), str), ai.tool_calls)
        results = [ToolMessage(get_weather(**tc["args"]), tool_call_id=tc["id"]) for tc in ai.tool_calls]
        return model.bind_tools([weather]).invoke([HumanMessage(WEATHER_Q), ai, *results]).content
    w.check("langchain", "bind_tools + ToolMessage", lambda: tool_round_trip(llm))

    def stream_tools():
        acc = None
        for ch in llm.bind_tools([weather], tool_choice="get_weather").stream(WEATHER_Q):
            acc = ch if acc is None else acc + ch
        return expect(acc.tool_calls and acc.tool_calls[0]["name"] == "get_weather", acc.tool_calls)
    w.check("langchain", "bind_tools stream", stream_tools)
    for method in ("json_schema", "function_calling"):
        w.check("langchain", f"with_structured_output {method}", lambda m=method: person(llm.with_structured_output(Person, method=m).invoke(PERSON_Q)))
    w.check("langchain", "with_structured_output json_schema stream", lambda: person(list(llm.with_structured_output(Person, method="json_schema").stream(PERSON_Q))[-1]))

    def json_mode():
        out = llm.with_structured_output(Person, method="json_mode", include_raw=True).invoke(PERSON_Q + " Answer in JSON with keys name and age.")
        raw = json.loads(out["raw"].content)  # the wire's part: json_object forces a JSON object
        if out["parsed"] is None:
            raise Verdict("MODEL", f"valid JSON of another shape (json_object enforces no schema): {raw}")
        return person(out["parsed"])
    w.check("langchain", "with_structured_output json_mode", json_mode)
    rllm = ChatOpenAI(model=CHAT, max_tokens=60, use_responses_api=True, **common)
    w.check("langchain", "Responses API invoke", lambda: expect(rllm.invoke("Say hi").text, "text"))
    w.check("langchain", "Responses API stream", lambda: expect("".join(ch.text for ch in rllm.stream("Say hi")), "text"))
    w.check("langchain", "Responses API bind_tools + ToolMessage", lambda: tool_round_trip(rllm))
    w.check("langchain", "Responses API structured json_schema", lambda: person(rllm.with_structured_output(Person, method="json_schema").invoke(PERSON_Q)))
    emb = OpenAIEmbeddings(model=EMBED, check_embedding_ctx_length=False, **common)
    w.check("langchain", "OpenAIEmbeddings (check_embedding_ctx_length=False)", lambda: expect([len(v) for v in emb.embed_documents(["a", "b"])] == [384, 384], 384))
    w.check("langchain", "OpenAIEmbeddings aembed_query", arun(lambda: _len384(emb.aembed_query("hello"))))
    w.check("langchain", "OpenAIEmbeddings default (tiktoken ids)", lambda: tiktoken_default(w))
    legacy = OpenAI(model=CHAT, max_tokens=10, **common)
    w.check("langchain", "OpenAI (completions) invoke", lambda: expect(legacy.invoke("The capital of France is"), "text"))
    w.check("langchain", "OpenAI (completions) stream", lambda: expect("".join(legacy.stream("The capital of France is")), "text"))


async def _len384(coro: Any) -> int:
    return expect(len(await coro) == 384, 384)


def tiktoken_default(w: Walk) -> Any:
    """OpenAIEmbeddings' default sends cl100k token ids, which only an OpenAI-tokenizer model can read."""
    import tiktoken
    from langchain_openai import OpenAIEmbeddings

    try:
        tiktoken.get_encoding("cl100k_base")
    except Exception as exc:  # noqa: BLE001 - offline: tiktoken downloads its BPE file on first use
        raise Verdict("SKIP", f"tiktoken cannot load cl100k_base here ({type(exc).__name__}); see docs/clients.md") from None
    try:
        OpenAIEmbeddings(model=EMBED, base_url=w.base_url, api_key=w.api_key, max_retries=0).embed_query("hello world")
    except Exception as exc:  # noqa: BLE001
        raise Verdict("KNOWN", f"cl100k ids refused: {exc}") from None
    raise Verdict("KNOWN", "cl100k ids embedded as this model's ids (wrong vectors): set check_embedding_ctx_length=False")


# ------------------------------------------------------------------------------------------ llamaindex
def llamaindex_checks(w: Walk) -> None:
    """LlamaIndex: OpenAILike (chat and completion models) and OpenAIEmbedding."""
    if not importable(w, "llamaindex", "llama_index.llms.openai_like", "llama_index.embeddings.openai"):
        return
    from llama_index.core.llms import ChatMessage
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.tools import FunctionTool
    from llama_index.embeddings.openai import OpenAIEmbedding
    from llama_index.llms.openai_like import OpenAILike

    def chat_llm() -> Any:  # one per event loop: the async client it caches is bound to the loop of its first use
        return OpenAILike(model=CHAT, api_base=w.base_url, api_key=w.api_key, is_chat_model=True, is_function_calling_model=True,
                          max_tokens=60, context_window=2048, max_retries=0)
    llm = chat_llm()
    hi = [ChatMessage(role="user", content="Say hi")]
    w.check("llamaindex", "chat", lambda: expect(llm.chat(hi).message.content, "text"))
    w.check("llamaindex", "stream_chat", lambda: expect("".join(r.delta for r in llm.stream_chat(hi)), "text"))
    w.check("llamaindex", "achat", arun(lambda: chat_llm().achat(hi)))

    async def astream():
        return expect("".join([r.delta async for r in await chat_llm().astream_chat(hi)]), "text")
    w.check("llamaindex", "astream_chat", arun(astream))
    comp = OpenAILike(model=CHAT, api_base=w.base_url, api_key=w.api_key, is_chat_model=False, max_tokens=10, max_retries=0)
    w.check("llamaindex", "complete (is_chat_model=False)", lambda: expect(comp.complete("The capital of France is").text, "text"))
    w.check("llamaindex", "stream_complete", lambda: expect("".join(r.delta for r in comp.stream_complete("The capital of France is")), "text"))

    def tools():
        r = llm.chat_with_tools([FunctionTool.from_defaults(fn=get_weather)], user_msg=WEATHER_Q, tool_required=True, allow_parallel_tool_calls=False)
        calls = llm.get_tool_calls_from_response(r, error_on_no_tool_call=True)
        return expect(calls[0].tool_name == "get_weather" and "city" in calls[0].tool_kwargs, calls)
    w.check("llamaindex", "chat_with_tools (tool_required)", tools)
    w.check("llamaindex", "structured_predict", lambda: person(llm.structured_predict(Person, PromptTemplate(PERSON_Q))))

    def stream_structured():
        parts = list(llm.stream_structured_predict(Person, PromptTemplate(PERSON_Q)))
        if not parts or getattr(parts[-1], "name", None) is None:
            raise Verdict("MODEL", "stream_structured_predict sends tool_choice auto: the model answered in text")
        return parts[-1]
    w.check("llamaindex", "stream_structured_predict", stream_structured)
    emb = OpenAIEmbedding(model_name=EMBED, api_base=w.base_url, api_key=w.api_key, max_retries=0)
    w.check("llamaindex", "OpenAIEmbedding batch", lambda: expect([len(v) for v in emb.get_text_embedding_batch(["a", "b"])] == [384, 384], 384))
    w.check("llamaindex", "OpenAIEmbedding async", arun(lambda: _len384(emb.aget_query_embedding("hello"))))


# --------------------------------------------------------------------------------------------- litellm
def litellm_checks(w: Walk) -> None:
    """LiteLLM's SDK with ``openai/<model>`` and ``api_base``."""
    if not importable(w, "litellm", "litellm"):
        return
    import litellm

    kw = dict(api_base=w.base_url, api_key=w.api_key)
    hi = [{"role": "user", "content": "Say hi"}]
    w.check("litellm", "completion", lambda: expect(litellm.completion(model=f"openai/{CHAT}", messages=hi, max_tokens=20, **kw).choices[0].message.content, "text"))
    w.check("litellm", "acompletion", arun(lambda: litellm.acompletion(model=f"openai/{FAST}", messages=hi, max_tokens=3, **kw)))

    def stream_usage():
        chunks = list(litellm.completion(model=f"openai/{FAST}", messages=hi, max_tokens=4, stream=True, stream_options={"include_usage": True}, **kw))
        usage = [ch.usage for ch in chunks if getattr(ch, "usage", None)]
        return expect(usage and usage[-1].completion_tokens == 4, usage)
    w.check("litellm", "stream + include_usage", stream_usage)

    async def astream():
        r = await litellm.acompletion(model=f"openai/{FAST}", messages=hi, max_tokens=4, stream=True, **kw)
        return expect([ch async for ch in r], "chunks")
    w.check("litellm", "acompletion stream", arun(astream))

    def tools(stream: bool):
        q = [{"role": "user", "content": WEATHER_Q}]
        r = litellm.completion(model=f"openai/{CHAT}", messages=q, tools=[TOOL], tool_choice="required", parallel_tool_calls=False,
                               max_tokens=60, stream=stream, **kw)
        m = (litellm.stream_chunk_builder(list(r)) if stream else r).choices[0].message
        call = m.tool_calls[0]
        expect("city" in json.loads(call.function.arguments), m)
        q += [m.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        return litellm.completion(model=f"openai/{CHAT}", messages=q, tools=[TOOL], max_tokens=20, **kw).choices[0].message.content
    w.check("litellm", "tools + tool result", lambda: tools(False))
    w.check("litellm", "tools stream + stream_chunk_builder", lambda: tools(True))
    w.check("litellm", "n=2 + logprobs", lambda: expect(len(litellm.completion(model=f"openai/{FAST}", messages=hi, max_tokens=3, n=2, logprobs=True,
                                                                            top_logprobs=1, **kw).choices) == 2, 2))
    w.check("litellm", "response_format pydantic", lambda: person(Person.model_validate_json(litellm.completion(
        model=f"openai/{CHAT}", messages=[{"role": "user", "content": PERSON_Q}], response_format=Person, max_tokens=60, **kw).choices[0].message.content)))
    w.check("litellm", "embedding", lambda: expect(len(litellm.embedding(model=f"openai/{EMBED}", input=["a", "b"], **kw).data[1]["embedding"]) == 384, 384))
    w.check("litellm", "aembedding", arun(lambda: litellm.aembedding(model=f"openai/{EMBED}", input=["a"], **kw)))
    w.check("litellm", "text_completion", lambda: expect(litellm.text_completion(model=f"openai/{CHAT}", prompt="The capital of France is", max_tokens=8, **kw).choices[0].text, "text"))
    w.check("litellm", "responses", lambda: expect(litellm.responses(model=f"openai/{FAST}", input="hi", max_output_tokens=5, **kw).output, "output"))


# ------------------------------------------------------------------------------------------ instructor
def instructor_checks(w: Walk) -> None:
    """instructor over the openai SDK, in the modes an OpenAI-compatible server can serve."""
    if not importable(w, "instructor", "instructor", "openai"):
        return
    import instructor
    import openai
    from instructor.core.exceptions import IncompleteOutputException, InstructorRetryException

    q = [{"role": "user", "content": PERSON_Q}]
    for mode in ("TOOLS", "TOOLS_STRICT", "JSON_SCHEMA", "JSON"):
        def one(mode: str = mode) -> Any:
            c = instructor.from_openai(openai.OpenAI(base_url=w.base_url, api_key=w.api_key, max_retries=0), mode=getattr(instructor.Mode, mode))
            try:
                return person(c.chat.completions.create(model=CHAT, messages=q, response_model=Person, max_tokens=80, max_retries=1))
            except (InstructorRetryException, IncompleteOutputException) as exc:
                # json_object: any JSON object, the schema only in the prompt; smollm2 may answer another shape,
                # or one that runs on (a growing array) until max_tokens (finish_reason length)
                if mode == "JSON":
                    raise Verdict("MODEL", f"json_object answer of another shape: {str(exc)[:150]}") from None
                raise
        w.check("instructor", f"Mode.{mode}", one)

    async def atools():
        c = instructor.from_openai(openai.AsyncOpenAI(base_url=w.base_url, api_key=w.api_key, max_retries=0), mode=instructor.Mode.TOOLS)
        return person(await c.chat.completions.create(model=CHAT, messages=q, response_model=Person, max_tokens=80))
    w.check("instructor", "async Mode.TOOLS", arun(atools))

    def partial():
        c = instructor.from_openai(openai.OpenAI(base_url=w.base_url, api_key=w.api_key, max_retries=0), mode=instructor.Mode.TOOLS)
        return person(list(c.chat.completions.create_partial(model=CHAT, messages=q, response_model=Person, max_tokens=80))[-1])
    w.check("instructor", "create_partial (stream) Mode.TOOLS", partial)
    w.check("instructor", "from_provider('openai/...')", lambda: person(instructor.from_provider(
        f"openai/{CHAT}", base_url=w.base_url, api_key=w.api_key).chat.completions.create(messages=q, response_model=Person, max_tokens=80)))


LIBRARIES: dict[str, Callable[[Walk], None]] = {
    "openai": openai_checks, "langchain": langchain_checks, "llamaindex": llamaindex_checks,
    "litellm": litellm_checks, "instructor": instructor_checks,
}


def _register_agents() -> None:
    from client_walk_agents import agents_checks, pydantic_ai_checks

    LIBRARIES["pydantic-ai"] = pydantic_ai_checks
    LIBRARIES["openai-agents"] = agents_checks


_register_agents()
