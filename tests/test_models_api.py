"""Discovery and naming: `GET /v1/models` from the providers' own lists, `/v1/models/{id}`,
`/`, unknown paths and methods in each client's error shape, and bare model names.

`flowc serve` runs in front of loopback providers whose list endpoints answer as each API
reference documents; the clients are the official `openai` and `anthropic` SDKs."""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from flowc.config import ProjectConfig
from runtime.gateway.models_api import LIST_WAIT, STARTUP_WAIT, priced_models
from tests.conftest import ROOT, start_server, stop_server
from tests.fakes import FakeServer, free_port, hang, http_error, ollama_text, openai_text
from tests.fakes_models import anthropic_models, ollama_tags, openai_models

CONFIG = """\
models:
  fast: openai/gpt-4o-mini
  local: ollama/qwen2.5:7b
  sonnet: claude-sonnet-4-6
  claude-opus-4-7: openai/gpt-4o-mini   # a name a client insists on, served by another
routes:
  - name: auto
    match: {model: auto}
    targets: [openai/gpt-4o-mini, anthropic/claude-sonnet-4-6]
fallbacks:
  openai/gpt-4o: [anthropic/claude-haiku-4-5]
providers:
  lmstudio: {base_url: "LMSTUDIO/v1"}
  groq: {base_url: "GROQ/v1", api_key_env: GROQ_KEY_FOR_TEST}
retry: {attempts: 0}
ledger: {flush_interval: 0.2}
"""
OPENAI_IDS = ["gpt-4o-mini", "gpt-4o", "o3-mini", "text-embedding-3-small", "dall-e-3"]
ANTHROPIC_PAGES = ([("claude-sonnet-4-6", "Claude Sonnet 4.6"),
                    ("claude-haiku-4-5", "Claude Haiku 4.5")],
                   [("claude-opus-4-1", "Claude Opus 4.1")])
OLLAMA_NAMES = ["qwen2.5:7b", "gpt-oss:20b", "llama3.2:latest"]
LMSTUDIO_IDS = ["qwen2.5:7b", "meta-llama/Llama-3.1-8B-Instruct"]


@dataclass
class Served:
    url: str
    fakes: dict[str, FakeServer]
    at_start: dict[str, list[str]]  # the list calls each provider got as the server started

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="sk-client", max_retries=0)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key="sk-ant-client", max_retries=0)

    def lists(self, name: str) -> list[str]:
        """The list calls provider ``name`` got (its other requests are model calls)."""
        return [r.path for r in self.fakes[name].requests
                if r.path.endswith(("/models", "/api/tags"))]


def serve(tmp: Path, fakes: dict[str, FakeServer], config: str = CONFIG
          ) -> tuple[str, object, float]:
    config = config.replace("LMSTUDIO", fakes["lmstudio"].url).replace(
        "GROQ", fakes["groq"].url)
    (tmp / "flowc.yaml").write_text(textwrap.dedent(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "OPENAI_BASE_URL": fakes["openai"].url + "/v1", "OPENAI_API_KEY": "sk-test-openai",
           "ANTHROPIC_BASE_URL": fakes["anthropic"].url, "ANTHROPIC_API_KEY": "sk-ant-test",
           "OLLAMA_HOST": fakes["ollama"].url, "GROQ_KEY_FOR_TEST": "gsk-test"}
    port = free_port()
    t0 = time.monotonic()
    proc = start_server(tmp, env, port)
    return f"http://127.0.0.1:{port}", proc, time.monotonic() - t0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    fakes = {k: FakeServer(kind).start() for k, kind in (
        ("openai", "openai"), ("anthropic", "anthropic"), ("ollama", "ollama"),
        ("lmstudio", "openai"), ("groq", "openai"))}
    # Each provider's first request is its list call: Ollama's and the configured servers'
    # at start-up, the vendors' at the first listing.
    fakes["openai"].then(openai_models(OPENAI_IDS))
    fakes["anthropic"].then(*anthropic_models(*ANTHROPIC_PAGES))
    fakes["ollama"].then(ollama_tags(OLLAMA_NAMES))
    fakes["lmstudio"].then(openai_models(LMSTUDIO_IDS))
    fakes["groq"].then(http_error(500, "list unavailable"))
    url, proc, _ = serve(tmp_path_factory.mktemp("models"), fakes)
    served = Served(url, fakes, {})
    served.at_start = {k: served.lists(k) for k in fakes}
    assert httpx.get(url + "/v1/models").status_code == 200
    yield served
    stop_server(proc)  # type: ignore[arg-type]
    for f in fakes.values():
        f.stop()


# -- GET /v1/models -------------------------------------------------------------------------
def test_the_openai_sdk_lists_every_model_a_client_can_use(served):
    models = {m.id: m for m in served.openai().models.list()}
    # Aliases, route names, and the models flowc.yaml's routes and fallbacks name.
    assert {"fast", "local", "sonnet", "claude-opus-4-7", "auto", "openai/gpt-4o-mini",
            "anthropic/claude-sonnet-4-6", "openai/gpt-4o",
            "anthropic/claude-haiku-4-5"} <= set(models)
    assert models["fast"].owned_by == "openai" and models["auto"].owned_by == "flowc"
    assert models["claude-opus-4-7"].owned_by == "openai"
    # Each provider's own list, under the bare name that reaches it.
    for name in OPENAI_IDS:
        assert models[name].owned_by == "openai" and models[name].object == "model"
    assert models["gpt-4o"].created == 1_715_367_049 + 1  # the provider's own
    for name in ("claude-sonnet-4-6", "claude-haiku-4-5", "claude-opus-4-1"):  # 2 pages
        assert models[name].owned_by == "anthropic"
    assert models["gpt-oss:20b"].owned_by == "ollama"  # only Ollama has it
    assert models["llama3.2:latest"].owned_by == "ollama"
    assert models["meta-llama/Llama-3.1-8B-Instruct"].owned_by == "lmstudio"
    # Two providers have qwen2.5:7b: each is listed under the name that reaches it.
    assert "qwen2.5:7b" not in models
    assert models["ollama/qwen2.5:7b"].owned_by == "ollama"
    assert models["lmstudio/qwen2.5:7b"].owned_by == "lmstudio"


def test_each_list_is_fetched_once_with_the_providers_own_credentials(served):
    # The lists that place bare names come first; the vendors' wait for a listing.
    assert served.at_start == {"openai": [], "anthropic": [], "ollama": ["/api/tags"],
                               "lmstudio": ["/v1/models"], "groq": ["/v1/models"]}
    for _ in range(3):
        assert httpx.get(served.url + "/v1/models").status_code == 200
    assert served.lists("openai") == ["/v1/models"]
    assert served.lists("anthropic") == ["/v1/models", "/v1/models"]  # two pages
    assert served.lists("ollama") == ["/api/tags"]
    assert served.lists("lmstudio") == ["/v1/models"]
    openai_call = served.fakes["openai"].requests[0]
    assert openai_call.headers["authorization"] == "Bearer sk-test-openai"
    anthropic_call = served.fakes["anthropic"].requests[0]
    assert anthropic_call.headers["x-api-key"] == "sk-ant-test"
    assert anthropic_call.headers["anthropic-version"] == "2023-06-01"


def test_a_failed_list_is_stood_in_for_by_the_price_data(served):
    priced = [m.id for m in priced_models("groq")]
    assert len(priced) > 5
    ids = {m.id: m.owned_by for m in served.openai().models.list()}
    assert served.lists("groq") == ["/v1/models"]  # it answered 500
    for name in priced:
        assert ids.get(name, ids.get(f"groq/{name}")) == "groq", name


def test_the_anthropic_sdk_gets_anthropics_list_shape_and_pages(served):
    client = served.anthropic()
    every = [m.id for m in served.openai().models.list()]
    first = client.models.list(limit=3)
    assert [m.id for m in first.data] == every[:3]
    assert first.has_more is True and first.first_id == every[0] and \
        first.last_id == every[2]
    assert [m.id for m in client.models.list(limit=7)] == every  # follows after_id
    back = client.models.list(limit=2, before_id=every[3])
    assert [m.id for m in back.data] == every[1:3] and back.has_more is True
    claude = {m.id: m for m in client.models.list(limit=1000).data}["claude-opus-4-1"]
    assert claude.type == "model" and claude.display_name == "Claude Opus 4.1"
    assert claude.created_at.year == 2025
    raw = httpx.get(served.url + "/v1/models", headers={"x-api-key": "k"}).json()
    assert set(raw) == {"data", "has_more", "first_id", "last_id"}
    with pytest.raises(anthropic.BadRequestError):
        client.models.list(limit=0)


# -- GET /v1/models/{id} --------------------------------------------------------------------
def test_one_model_by_id_even_with_slashes_and_colons(served):
    client = served.openai()
    assert client.models.retrieve("gpt-oss:20b").owned_by == "ollama"
    got = client.models.retrieve("ollama/qwen2.5:7b")
    assert (got.id, got.owned_by) == ("ollama/qwen2.5:7b", "ollama")
    assert client.models.retrieve("meta-llama/Llama-3.1-8B-Instruct").owned_by == "lmstudio"
    assert client.models.retrieve("openai/o3-mini").owned_by == "openai"  # a listed model
    assert client.models.retrieve("fast").owned_by == "openai"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("gpt-does-not-exist")
    assert exc.value.code == "model_not_found"
    assert served.anthropic().models.retrieve("claude-haiku-4-5").display_name == \
        "Claude Haiku 4.5"
    with pytest.raises(anthropic.NotFoundError) as aexc:
        served.anthropic().models.retrieve("claude-nope")
    assert aexc.value.body["error"]["type"] == "not_found_error"


# -- the root, unknown paths and methods ----------------------------------------------------
def test_the_root_answers_get_and_head(served):
    head = httpx.head(served.url + "/")
    assert head.status_code == 200 and head.content == b""
    got = httpx.get(served.url + "/")
    assert got.status_code == 200
    assert got.json()["service"] == "flowc"
    assert got.json()["endpoints"]["/v1/chat/completions"] == "POST"


def test_unknown_paths_and_methods_in_openais_error_shape(served):
    client = served.openai()
    with pytest.raises(openai.NotFoundError) as nf:
        client.get("/nope", cast_to=object)
    assert nf.value.body["message"] == "Invalid URL (GET /v1/nope)"
    with pytest.raises(openai.APIStatusError) as wrong:
        client.get("/chat/completions", cast_to=object)  # a POST-only model API
    assert wrong.value.status_code == 405
    assert wrong.value.response.headers["allow"] == "POST"
    assert wrong.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.APIStatusError) as post:
        client.post("/models", cast_to=object, body={})
    assert post.value.status_code == 405 and post.value.response.headers["allow"] == "GET"
    for method in ("GET", "DELETE", "PATCH"):
        r = httpx.request(method, served.url + "/v2/whatever")
        assert r.status_code == 404 and "detail" not in r.json()
        assert r.json()["error"]["message"] == f"Invalid URL ({method} /v2/whatever)"
    # A malformed query parameter, FastAPI's 422 `detail`, in the same shape.
    with pytest.raises(openai.BadRequestError) as bad:
        client.get("/runs?limit=many", cast_to=object)
    assert "limit" in bad.value.message


def test_unknown_paths_and_methods_under_messages_in_anthropics_shape(served):
    client = served.anthropic()
    with pytest.raises(anthropic.NotFoundError) as nf:
        client.post("/v1/messages/nope", cast_to=object, body={})
    assert nf.value.body["type"] == "error"
    assert nf.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.APIStatusError) as wrong:
        client.get("/v1/messages", cast_to=object)
    assert wrong.value.status_code == 405
    assert wrong.value.body["error"]["type"] == "invalid_request_error"
    assert wrong.value.response.headers["allow"] == "POST"


# -- bare names -------------------------------------------------------------------------------
def test_a_bare_name_only_ollama_has_goes_to_ollama(served):
    fake = served.fakes["ollama"]
    fake.then(ollama_text("local answer"))
    raw = served.openai().chat.completions.with_raw_response.create(
        model="gpt-oss:20b", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-flowc-provider"] == "ollama"
    assert raw.parse().choices[0].message.content == "local answer"
    assert fake.requests[-1].path == "/api/chat"
    assert fake.requests[-1].body["model"] == "gpt-oss:20b"


def test_a_bare_name_with_a_slash_goes_to_the_server_that_lists_it(served):
    fake = served.fakes["lmstudio"]
    fake.then(openai_text("from lmstudio", model="meta-llama/Llama-3.1-8B-Instruct"))
    raw = served.openai().chat.completions.with_raw_response.create(
        model="meta-llama/Llama-3.1-8B-Instruct", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-flowc-provider"] == "lmstudio"
    assert raw.headers["x-flowc-model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert fake.requests[-1].body["model"] == "meta-llama/Llama-3.1-8B-Instruct"


def test_well_known_bare_names_and_published_aliases(served):
    served.fakes["openai"].then(openai_text("ok"), openai_text("ok"))
    client = served.openai()
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    # The served model as the provider names it, in the body and the header.
    assert raw.headers["x-flowc-model"] == "gpt-4o-mini-2024-07-18"
    assert raw.parse().model == "gpt-4o-mini-2024-07-18"
    # An alias publishes a Claude name (say, for a client that insists) served by OpenAI.
    raw = served.anthropic().messages.with_raw_response.create(
        model="claude-opus-4-7", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-flowc-provider"] == "openai"


def test_an_ambiguous_bare_name_is_refused_with_the_choices(served):
    with pytest.raises(openai.BadRequestError) as exc:
        served.openai().chat.completions.create(
            model="qwen2.5:7b", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.code == "model_ambiguous"
    assert "ollama/qwen2.5:7b, lmstudio/qwen2.5:7b" in exc.value.message or \
        "lmstudio/qwen2.5:7b, ollama/qwen2.5:7b" in exc.value.message
    with pytest.raises(anthropic.BadRequestError) as aexc:
        served.anthropic().messages.create(
            model="qwen2.5:7b", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert "ambiguous" in aexc.value.message
    # Named with its provider, either one is served.
    served.fakes["ollama"].then(ollama_text("ok"))
    assert served.openai().chat.completions.create(
        model="ollama/qwen2.5:7b", messages=[{"role": "user", "content": "hi"}]
    ).choices[0].message.content == "ok"


def test_names_without_any_list_as_flowc_check_sees_them():
    """Offline (`flowc check`, or before any list arrives) a bare name is placed by its
    form; a provider's list overrides the guess, and the vendor's family settles a name
    several providers list."""
    config = ProjectConfig.model_validate({"models": {"mine": "gpt-oss:20b"}})
    assert config.resolve_model("qwen2.5:7b") == ("ollama", "qwen2.5:7b")
    assert config.resolve_model("gpt-oss:20b") == ("ollama", "gpt-oss:20b")
    assert config.resolve_model("mine") == ("ollama", "gpt-oss:20b")
    assert config.resolve_model("ft:gpt-4o-mini:acme::abc") == (
        "openai", "ft:gpt-4o-mini:acme::abc")
    assert config.resolve_model("text-embedding-3-small") == (
        "openai", "text-embedding-3-small")
    assert config.resolve_model("llama3.2") is None
    assert config.resolve_model("org/model") is None
    listed = {"openai": {"gpt-4o"}, "proxy": {"gpt-4o", "llama3.2"}, "ollama": {"llama3.2"}}
    assert config.model_choices("gpt-4o", listed) == [("openai", "gpt-4o")]
    assert config.model_choices("llama3.2", listed) == [("ollama", "llama3.2"),
                                                        ("proxy", "llama3.2")]
    assert config.model_choices("org/model", {"vllm": {"org/model"}}) == [
        ("vllm", "org/model")]


# -- a slow list ------------------------------------------------------------------------------
def test_a_slow_list_delays_neither_start_up_nor_requests_for_long(tmp_path):
    fakes = {k: FakeServer(kind).start() for k, kind in (
        ("openai", "openai"), ("anthropic", "anthropic"), ("ollama", "ollama"),
        ("lmstudio", "openai"), ("groq", "openai"))}
    fakes["openai"].then(openai_models(OPENAI_IDS))
    fakes["anthropic"].then(hang(30))
    fakes["ollama"].then(hang(30))
    url, proc, took = serve(tmp_path, fakes)
    try:
        assert took < STARTUP_WAIT + 8  # the interpreter's start-up included
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        t0 = time.monotonic()
        ids = {m.id: m.owned_by for m in client.models.list()}
        assert time.monotonic() - t0 < LIST_WAIT + 1.5
        assert ids["gpt-4o"] == "openai"
        # Anthropic's list has not come: its price data's names stand in meanwhile;
        # Ollama has none, but its `name:tag` names are still placed by their form.
        assert ids["claude-haiku-4-5"] == "anthropic" and "gpt-oss:20b" not in ids
        fakes["ollama"].then(ollama_text("placed by its form"))
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-oss:20b", messages=[{"role": "user", "content": "hi"}])
        assert raw.headers["x-flowc-provider"] == "ollama"
    finally:
        stop_server(proc)  # type: ignore[arg-type]
        for f in fakes.values():
            f.stop()
