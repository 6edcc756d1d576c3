"""Python agent SDKs pointed at flowc: the OpenAI Agents SDK, LangChain's ChatOpenAI and
ChatAnthropic, pydantic-ai. Each runs a function tool of its own through the gateway and
returns a structured answer where the SDK has one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from pydantic import BaseModel

from tests.clients.conftest import Clients
from tests.clients.upstream import Turn

KEY = "sk-client"


class City(BaseModel):
    name: str
    population: int


PARIS = {"name": "Paris", "population": 2102650}


def lookup(city: str) -> str:
    """Look up facts about a city."""
    return f"{city} has 2102650 inhabitants (flowc-census)"


def lookup_turn(**extra: object) -> Turn:
    return Turn(tool="lookup", arguments={"city": "Paris"}, **extra)  # type: ignore[arg-type]


def reached(clients: Clients) -> bool:
    return any("flowc-census" in t for t in clients.tool_results())


# -- OpenAI Agents SDK -----------------------------------------------------------------------------
@pytest.fixture
def agents_client(clients: Clients) -> Iterator[object]:
    """The Agents SDK's default client, at flowc (its traces, which would go to OpenAI's
    platform, off)."""
    import agents
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=clients.url + "/v1", api_key=KEY)
    agents.set_default_openai_client(client, use_for_tracing=False)
    yield client
    agents.set_default_openai_api("responses")


def run_agents_sdk(clients: Clients, api: str, stream: bool = False) -> None:
    import agents

    agents.set_default_openai_api(api)  # "responses" is the SDK's default
    clients.play(lookup_turn(answer="Paris has about 2.1 million people."))
    agent = agents.Agent(name="geo", instructions="Answer with facts.", model="gpt-4o-mini",
                         tools=[agents.function_tool(lookup)])
    prompt = "How many people live in Paris?"
    if stream:
        async def streamed() -> object:
            result = agents.Runner.run_streamed(agent, prompt)
            async for _ in result.stream_events():
                pass
            return result.final_output
        final = asyncio.run(streamed())
    else:
        final = agents.Runner.run_sync(agent, prompt).final_output
    assert str(final).strip() == "Paris has about 2.1 million people."
    assert reached(clients)
    path = {"responses": "/v1/responses", "chat_completions": "/v1/chat/completions"}[api]
    assert {r.path for r in clients.calls("openai")} == {path}
    assert {bool(r.body.get("stream")) for r in clients.calls("openai")} == {stream}
    assert {r["model"] for r in clients.ledger()} == {"gpt-4o-mini"}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_openai_agents_sdk(clients: Clients, agents_client, api: str, stream: bool) -> None:
    """``responses``: the SDK's default model API."""
    run_agents_sdk(clients, api, stream)


# -- LangChain -----------------------------------------------------------------------------------
def _langchain_round_trip(clients: Clients, model, stream: bool) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    lookup_tool = tool(lookup)
    bound = model.bind_tools([lookup_tool])

    def call(messages: list) -> object:
        if not stream:
            return bound.invoke(messages)
        whole = None
        for chunk in bound.stream(messages):
            whole = chunk if whole is None else whole + chunk
        return whole
    messages = [HumanMessage("How many people live in Paris?")]
    first = call(messages)
    assert [c["name"] for c in first.tool_calls] == ["lookup"]
    messages += [first, ToolMessage(lookup_tool.invoke(first.tool_calls[0]["args"]),
                                    tool_call_id=first.tool_calls[0]["id"])]
    final = call(messages)
    assert _text(final.content) == "Paris has about 2.1 million people."
    assert reached(clients)
    assert {bool(r.body.get("stream")) for _, r in clients.requests()} == {stream}


def _text(content: str | list) -> str:
    """A message's text (streamed Anthropic content arrives as blocks)."""
    if isinstance(content, str):
        return content.strip()
    return "".join(b.get("text", "") for b in content if isinstance(b, dict)).strip()


@pytest.mark.parametrize("stream", [False, True])
def test_langchain_chat_openai(clients: Clients, stream: bool) -> None:
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model="gpt-4o-mini", base_url=clients.url + "/v1", api_key=KEY)
    clients.play(lookup_turn(answer="Paris has about 2.1 million people."))
    _langchain_round_trip(clients, model, stream)
    clients.play(Turn(answer=json.dumps(PARIS)))
    city = model.with_structured_output(City).invoke("Describe Paris.")
    assert city == City(**PARIS)
    assert clients.calls("openai")[-1].body["response_format"]["type"] == "json_schema"
    assert {(r["model"], r["provider"]) for r in clients.ledger()} == {
        ("gpt-4o-mini", "openai")}


@pytest.mark.parametrize("stream", [False, True])
def test_langchain_chat_openai_on_responses(clients: Clients, stream: bool) -> None:
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model="gpt-4o-mini", base_url=clients.url + "/v1", api_key=KEY,
                       use_responses_api=True)
    clients.play(lookup_turn(answer="Paris has about 2.1 million people."))
    _langchain_round_trip(clients, model, stream)
    clients.play(Turn(answer=json.dumps(PARIS)))
    assert model.with_structured_output(City).invoke("Describe Paris.") == City(**PARIS)
    assert {r.path for r in clients.calls("openai")} == {"/v1/responses"}
    assert {r["model"] for r in clients.ledger()} == {"gpt-4o-mini"}


@pytest.mark.parametrize(("method", "stream"), [("function_calling", False),
                                                ("json_schema", True)])
def test_langchain_chat_anthropic(clients: Clients, method: str, stream: bool) -> None:
    from langchain_anthropic import ChatAnthropic

    model = ChatAnthropic(model="claude-sonnet-4-6", base_url=clients.url, api_key=KEY)
    clients.play(lookup_turn(answer="Paris has about 2.1 million people."))
    _langchain_round_trip(clients, model, stream)
    clients.play(Turn(answer=json.dumps(PARIS), final_tool="City", final_arguments=PARIS))
    city = model.with_structured_output(City, method=method).invoke("Describe Paris.")
    assert city == City(**PARIS)
    assert {(r["model"], r["provider"]) for r in clients.ledger()} == {
        ("claude-sonnet-4-6", "anthropic")}


# -- pydantic-ai ---------------------------------------------------------------------------------
# flowc model name -> the upstream that serves it (all through chat completions)
PYDANTIC_MODELS = {"openai/gpt-4o-mini": "openai", "anthropic/claude-sonnet-4-6": "anthropic",
                   "ollama/qwen2.5:7b": "ollama"}


def _pydantic_agent(clients: Clients, model_name: str, output: str):
    from pydantic_ai import Agent, NativeOutput, ToolOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(model_name, provider=OpenAIProvider(
        base_url=clients.url + "/v1", api_key=KEY))
    output_type = NativeOutput(City) if output == "native" else ToolOutput(City)
    return Agent(model, output_type=output_type, tools=[lookup])


def run_pydantic_ai(clients: Clients, model_name: str, output: str,
                    stream: bool = False) -> None:
    agent = _pydantic_agent(clients, model_name, output)
    clients.play(lookup_turn(answer=json.dumps(PARIS), final_tool="final_result",
                             final_arguments=PARIS))
    prompt = "How many people live in Paris?"

    async def streamed() -> City:
        async with agent.run_stream(prompt) as result:
            return await result.get_output()
    got = asyncio.run(streamed()) if stream else asyncio.run(agent.run(prompt)).output
    assert got == City(**PARIS)
    assert reached(clients)
    assert {bool(r.body.get("stream")) for _, r in clients.requests()} == {stream}
    assert {(r["model"], r["provider"]) for r in clients.ledger()} == {
        (model_name, PYDANTIC_MODELS[model_name])}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("model_name", "output"), [
    ("openai/gpt-4o-mini", "native"), ("openai/gpt-4o-mini", "tool"),
    ("anthropic/claude-sonnet-4-6", "tool"),
    ("ollama/qwen2.5:7b", "tool")])  # a forced tool on Ollama
def test_pydantic_ai(clients: Clients, model_name: str, output: str, stream: bool) -> None:
    run_pydantic_ai(clients, model_name, output, stream)


@pytest.mark.parametrize("stream", [False, True])
def test_pydantic_ai_native_output_on_ollama(clients: Clients, stream: bool) -> None:
    """Without function tools: Ollama's `format` constrains the whole answer to the output
    schema, so a model given one cannot call a tool in the same turn."""
    from pydantic_ai import Agent, NativeOutput

    agent = _pydantic_agent(clients, "ollama/qwen2.5:7b", "native")
    agent = Agent(agent.model, output_type=NativeOutput(City))
    clients.play(Turn(answer=json.dumps(PARIS)))

    async def streamed() -> City:
        async with agent.run_stream("Describe Paris.") as result:
            return await result.get_output()
    got = asyncio.run(streamed()) if stream else asyncio.run(agent.run("Describe Paris.")).output
    assert got == City(**PARIS)
    (call,) = clients.calls("ollama")
    assert call.body["format"]["required"] == ["name", "population"]
    assert {(r["model"], r["provider"]) for r in clients.ledger()} == {
        ("ollama/qwen2.5:7b", "ollama")}


def test_pydantic_ai_anthropic_model(clients: Clients) -> None:
    from pydantic_ai import Agent, ToolOutput
    from pydantic_ai.models.anthropic import AnthropicModel
    from pydantic_ai.providers.anthropic import AnthropicProvider

    model = AnthropicModel("claude-sonnet-4-6", provider=AnthropicProvider(
        base_url=clients.url, api_key=KEY))
    agent = Agent(model, output_type=ToolOutput(City), tools=[lookup])
    clients.play(lookup_turn(final_tool="final_result", final_arguments=PARIS))
    result = asyncio.run(agent.run("How many people live in Paris?"))
    assert result.output == City(**PARIS)
    assert reached(clients)
    assert {r["provider"] for r in clients.ledger()} == {"anthropic"}


@pytest.mark.parametrize("output", ["native", "tool"])
def test_pydantic_ai_responses_model(clients: Clients, output: str) -> None:
    from pydantic_ai import Agent, NativeOutput, ToolOutput
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIResponsesModel("gpt-4o-mini", provider=OpenAIProvider(
        base_url=clients.url + "/v1", api_key=KEY))
    agent = Agent(model, output_type=NativeOutput(City) if output == "native"
                  else ToolOutput(City), tools=[lookup])
    clients.play(lookup_turn(answer=json.dumps(PARIS), final_tool="final_result",
                             final_arguments=PARIS))
    result = asyncio.run(agent.run("How many people live in Paris?"))
    assert result.output == City(**PARIS)
    assert reached(clients)
    assert {r.path for r in clients.calls("openai")} == {"/v1/responses"}
    assert {r["model"] for r in clients.ledger()} == {"gpt-4o-mini"}
