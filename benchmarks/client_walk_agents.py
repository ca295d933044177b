"""client_walk.py's agent frameworks: pydantic-ai and openai-agents, on chat completions and on Responses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from client_walk import Verdict, Walk
from client_walk_checks import CHAT, PERSON_Q, WEATHER_Q, Person, arun, expect, importable, person


def pydantic_ai_checks(w: Walk) -> None:
    """pydantic-ai Agents over OpenAIChatModel and OpenAIResponsesModel with an OpenAIProvider(base_url=...)."""
    if not importable(w, "pydantic-ai", "pydantic_ai", "pydantic_ai.models.openai"):
        return
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.capabilities import AbstractCapability
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    @dataclass
    class ToolFirst(AbstractCapability):
        """Force a tool call on the first step only: pydantic-ai's documented per-step tool_choice."""

        def get_model_settings(self) -> Any:
            return lambda ctx: ModelSettings(tool_choice="required") if ctx.run_step <= 1 else ModelSettings()

    settings = ModelSettings(max_tokens=80, parallel_tool_calls=False)
    for api, cls in (("chat", OpenAIChatModel), ("responses", OpenAIResponsesModel)):
        def model(cls: Any = cls) -> Any:  # a provider per event loop: its AsyncOpenAI is bound to one
            return cls(CHAT, provider=OpenAIProvider(base_url=w.base_url, api_key=w.api_key))

        w.check("pydantic-ai", f"{api}: run_sync", lambda m=model: expect(Agent(m(), model_settings=settings).run_sync("Say hi").output, "text"))

        async def stream(m: Any = model) -> Any:
            async with Agent(m(), model_settings=settings).run_stream("Say hi") as r:
                return expect("".join([t async for t in r.stream_text(delta=True)]), "text")
        w.check("pydantic-ai", f"{api}: run_stream", arun(stream))

        def tool_agent(m: Any) -> tuple[Any, list[str]]:
            calls: list[str] = []
            agent = Agent(m(), model_settings=settings, capabilities=[ToolFirst()])

            @agent.tool_plain
            def get_weather(city: str) -> str:
                """Get the weather for a city."""
                calls.append(city)
                return "sunny"
            return agent, calls

        async def tool(m: Any = model) -> Any:
            agent, calls = tool_agent(m)
            out = (await agent.run(WEATHER_Q)).output
            return expect(len(calls) == 1, (calls, out))
        w.check("pydantic-ai", f"{api}: agent with a tool (tool result round trip)", arun(tool))

        async def tool_stream(m: Any = model) -> Any:
            agent, calls = tool_agent(m)
            async with agent.run_stream(WEATHER_Q) as r:
                out = "".join([t async for t in r.stream_text(delta=True)])
            return expect(len(calls) == 1, (calls, out))
        w.check("pydantic-ai", f"{api}: run_stream with a tool", arun(tool_stream))
        w.check("pydantic-ai", f"{api}: output_type (tool output)", lambda m=model: person(Agent(m(), output_type=Person, model_settings=settings).run_sync(PERSON_Q).output))
        w.check("pydantic-ai", f"{api}: NativeOutput (json_schema)", lambda m=model: person(Agent(m(), output_type=NativeOutput(Person), model_settings=settings).run_sync(PERSON_Q).output))

        async def stream_output(m: Any = model) -> Any:
            async with Agent(m(), output_type=Person, model_settings=settings).run_stream(PERSON_Q) as r:
                return person(await r.get_output())
        w.check("pydantic-ai", f"{api}: run_stream output_type", arun(stream_output))


def agents_checks(w: Walk) -> None:
    """The OpenAI Agents SDK with its chat-completions model and its Responses model on an AsyncOpenAI(base_url=...)."""
    if not importable(w, "openai-agents", "agents", "openai"):
        return
    import openai
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool,
                        set_tracing_disabled)

    set_tracing_disabled(True)  # its tracing exports to api.openai.com with the client's key otherwise
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the weather for a city."""
        calls.append(city)
        return "sunny"

    for api, cls in (("chat", OpenAIChatCompletionsModel), ("responses", OpenAIResponsesModel)):
        def model(cls: Any = cls) -> Any:  # the AsyncOpenAI is made inside each check's event loop
            return cls(CHAT, openai.AsyncOpenAI(base_url=w.base_url, api_key=w.api_key, max_retries=0))

        plain = ModelSettings(max_tokens=60)
        # tool_choice required on the first turn; the SDK resets it after a tool call (reset_tool_choice)
        forced = ModelSettings(max_tokens=60, tool_choice="required", parallel_tool_calls=False)
        w.check("openai-agents", f"{api}: Runner.run", arun(lambda m=model: _final(Runner.run(Agent(name="a", model=m(), model_settings=plain), "Say hi"))))

        async def streamed(m: Any = model) -> Any:
            r = Runner.run_streamed(Agent(name="a", model=m(), model_settings=plain), "Say hi")
            events = [e async for e in r.stream_events()]
            return expect(r.final_output and events, (len(events), r.final_output))
        w.check("openai-agents", f"{api}: Runner.run_streamed", arun(streamed))

        async def tool(m: Any = model, stream: bool = False) -> Any:
            calls.clear()
            agent = Agent(name="w", model=m(), tools=[get_weather], instructions="You report the weather.", model_settings=forced)
            if stream:
                r = Runner.run_streamed(agent, WEATHER_Q)
                [e async for e in r.stream_events()]
            else:
                r = await Runner.run(agent, WEATHER_Q)
            expect(calls == ["Paris"] or len(calls) == 1, calls)
            follow = await Runner.run(agent, r.to_input_list() + [{"role": "user", "content": "And in Rome?"}])
            return expect(len(calls) == 2 and follow.final_output, (calls, follow.final_output))
        w.check("openai-agents", f"{api}: function tool + follow-up turn", arun(tool))
        w.check("openai-agents", f"{api}: function tool streamed", arun(lambda m=model: tool(m, stream=True)))
        w.check("openai-agents", f"{api}: output_type", arun(lambda m=model: _person_final(Runner.run(
            Agent(name="p", model=m(), output_type=Person, model_settings=plain), PERSON_Q))))


async def _final(coro: Any) -> Any:
    return expect((await coro).final_output, "final_output")


async def _person_final(coro: Any) -> Any:
    out = (await coro).final_output
    if out is None:
        raise Verdict("MODEL", "no final output")
    return person(out)
