"""`POST /v1/embeddings` through the official `openai` SDK against `flowc serve`, in front
of loopback servers speaking OpenAI's `/v1/embeddings` and Ollama's `/api/embed`: verbatim
to OpenAI and OpenAI-compatible servers, translated for Ollama (float and base64, single
and batch), refused for Anthropic, and every call a ledger row with its tokens and cost."""

from __future__ import annotations

import base64
import os
import struct
import textwrap
import time
from collections.abc import Iterator
from decimal import Decimal

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.providers.base import tokens_of
from runtime.providers.embeddings import base64_vector
from tests.conftest import ROOT, Gateway, start_server, stop_server
from tests.fakes import FakeServer, free_port, http_error, json_body
from tests.fakes_ollama import ollama_embed, openai_embeddings, vector_of


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0)


def rows(gw, where: str) -> list[list]:
    time.sleep(0.5)  # one flush interval (0.2 s) and some
    return gw.sql("SELECT provider, served_model, status, prompt_tokens, completion_tokens, "
                  f"cost_usd, usage_estimated, error_class FROM requests WHERE {where} "
                  "ORDER BY ts")


def vectors(done) -> list[list[float]]:
    return [d.embedding for d in done.data]


# -- OpenAI: verbatim ----------------------------------------------------------------------------
def test_openai_gets_the_request_as_sent_and_the_answer_goes_back_as_it_came(gw):
    gw.openai.then(openai_embeddings(prompt_tokens=8))
    raw = client(gw).embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="The food was delicious.",
        extra_body={"a_field_flowc_does_not_know": 1})
    done = raw.parse()  # the SDK asked for base64 and decoded it
    assert vectors(done) == [vector_of("The food was delicious.")]
    assert done.usage.prompt_tokens == 8 and done.model == "text-embedding-3-small"
    sent = gw.openai.requests[-1]
    assert sent.path == "/v1/embeddings"
    assert sent.body == {"model": "text-embedding-3-small", "input": "The food was delicious.",
                         "encoding_format": "base64", "a_field_flowc_does_not_know": 1}
    assert sent.headers["authorization"] == "Bearer sk-test-openai"
    assert raw.headers["x-flowc-provider"] == "openai"
    # text-embedding-3-small: $0.02 per 1M tokens -> 8 * 0.02e-6
    assert raw.headers["x-flowc-cost-usd"] == "0.00000016"
    row = rows(gw, "provider = 'openai'")[-1]
    assert row[:5] == ["openai", "text-embedding-3-small", "ok", 8, 0]
    assert Decimal(row[5]) == Decimal("0.00000016") and row[6] is False


def test_openai_by_a_provider_name_gets_only_its_model_replaced(gw):
    gw.openai.then(openai_embeddings(prompt_tokens=5, model="text-embedding-3-large"))
    done = client(gw).embeddings.create(
        model="openai/text-embedding-3-large", input=["a", "b"], encoding_format="float",
        dimensions=4, user="u-1")
    assert vectors(done) == [vector_of("a", 4), vector_of("b", 4)]
    assert gw.openai.requests[-1].body == {
        "model": "text-embedding-3-large", "input": ["a", "b"], "user": "u-1",
        "dimensions": 4, "encoding_format": "float"}
    row = rows(gw, "provider = 'openai'")[-1]
    assert row[:4] == ["openai", "text-embedding-3-large", "ok", 5]
    assert Decimal(row[5]) == Decimal("0.00000065")  # $0.13 per 1M tokens


def test_token_id_inputs_go_to_openai_as_they_are(gw):
    gw.openai.then(openai_embeddings(prompt_tokens=3))
    client(gw).embeddings.create(model="text-embedding-3-small", input=[[101, 2023, 102]],
                                 encoding_format="float")
    assert gw.openai.requests[-1].body["input"] == [[101, 2023, 102]]


def test_an_openai_error_reaches_the_client_in_openais_shape(gw):
    gw.openai.then(http_error(400, "This model's maximum context length is 8192 tokens"))
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).embeddings.create(model="text-embedding-3-small", input="x" * 10)
    assert "maximum context length is 8192 tokens" in exc.value.body["message"]
    assert rows(gw, "provider = 'openai'")[-1][2] == "error"


def test_a_5xx_is_retried_and_each_attempt_is_a_row(gw):
    gw.openai.then(http_error(503, "overloaded"), openai_embeddings(prompt_tokens=2))
    done = client(gw).embeddings.create(model="text-embedding-3-small", input="hi")
    assert len(done.data) == 1 and len(gw.openai.requests) == 2
    assert [r[2] for r in rows(gw, "provider = 'openai'")[-2:]] == ["error", "ok"]


# -- Ollama: /api/embed --------------------------------------------------------------------------
def test_ollama_float_single(gw):
    gw.ollama.then(ollama_embed(prompt_eval_count=6))
    done = client(gw).embeddings.create(model="ollama/all-minilm", input="Why is the sky blue?",
                                        encoding_format="float")
    assert vectors(done) == [vector_of("Why is the sky blue?")]
    assert done.data[0].index == 0 and done.data[0].object == "embedding"
    assert done.object == "list" and done.model == "all-minilm"
    assert done.usage.prompt_tokens == 6 and done.usage.total_tokens == 6
    sent = gw.ollama.requests[-1]
    assert sent.path == "/api/embed"
    assert sent.body == {"model": "all-minilm", "input": "Why is the sky blue?"}
    row = rows(gw, "provider = 'ollama'")[-1]
    assert row[:5] == ["ollama", "all-minilm", "ok", 6, 0]
    assert Decimal(row[5]) == 0 and row[6] is False  # a local model costs $0


def test_ollama_base64_batch_as_the_sdk_asks_by_default(gw):
    texts = ["Why is the sky blue?", "Why is the grass green?", "Ünïcødé ✓"]
    gw.ollama.then(ollama_embed(prompt_eval_count=21))
    done = client(gw).embeddings.create(model="ollama/all-minilm", input=texts)
    assert vectors(done) == [vector_of(t) for t in texts]
    assert [d.index for d in done.data] == [0, 1, 2]
    assert gw.ollama.requests[-1].body == {"model": "all-minilm", "input": texts}
    assert rows(gw, "provider = 'ollama'")[-1][3] == 21


def test_ollama_base64_is_openais_encoding_float32_little_endian(gw):
    gw.ollama.then(ollama_embed())
    r = httpx.post(gw.url + "/v1/embeddings", timeout=10, json={
        "model": "ollama/all-minilm", "input": ["one", "two"], "encoding_format": "base64"})
    assert r.status_code == 200
    for item, text in zip(r.json()["data"], ["one", "two"], strict=True):
        vec = vector_of(text)
        assert base64.b64decode(item["embedding"]) == struct.pack(f"<{len(vec)}f", *vec)


def test_ollama_dimensions_are_passed_on(gw):
    gw.ollama.then(ollama_embed())
    done = client(gw).embeddings.create(model="ollama/qwen3-embedding", input="x",
                                        dimensions=4, encoding_format="float")
    assert len(done.data[0].embedding) == 4
    assert gw.ollama.requests[-1].body == {"model": "qwen3-embedding", "input": "x",
                                           "dimensions": 4}


def test_ollama_without_counts_is_estimated_and_marked(gw):
    texts = ["Why is the sky blue?", "Why is the grass green?"]
    gw.ollama.then(ollama_embed(prompt_eval_count=None))  # as the reference's batch example
    done = client(gw).embeddings.create(model="ollama/all-minilm", input=texts)
    expected = sum(tokens_of(len(t)) for t in texts)
    assert done.usage.prompt_tokens == expected
    row = rows(gw, "provider = 'ollama'")[-1]
    assert (row[3], row[6]) == (expected, True)  # prompt tokens, usage_estimated


def test_ollama_answering_the_wrong_number_of_vectors_is_its_failure(gw):
    gw.ollama.then(*[ollama_embed(count=1)] * 3)
    with pytest.raises(openai.APIStatusError) as exc:
        client(gw).embeddings.create(model="ollama/all-minilm", input=["a", "b"])
    assert exc.value.status_code == 502
    assert "1 embeddings for 2 inputs" in exc.value.body["message"]
    assert len(gw.ollama.requests) == 3  # a 502 is retried (retry.attempts: 2)


def test_an_ollama_error_is_passed_on(gw):
    gw.ollama.then(http_error(404, "model 'nomic-embed-text' not found", kind="ollama"))
    with pytest.raises(openai.NotFoundError) as exc:
        client(gw).embeddings.create(model="ollama/nomic-embed-text", input="x")
    assert "model 'nomic-embed-text' not found" in exc.value.body["message"]


@pytest.mark.parametrize(("value", "message"), [
    ([[1, 2, 3]], "'input' does not support token arrays with this model (all-minilm on "
     "ollama)"),
    ([1, 2, 3], "does not support token arrays"),
    (["ok", ""], "An input cannot be an empty string."),
    ("", "An input cannot be an empty string."),
])
def test_what_ollama_cannot_embed_is_refused(gw, value, message):
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).embeddings.create(model="ollama/all-minilm", input=value)
    assert message in exc.value.body["message"] and exc.value.body["param"] == "input"
    assert gw.ollama.requests == []
    assert rows(gw, "provider = 'ollama'")[-1][2] == "refused"


# -- Anthropic and the edge ------------------------------------------------------------------------
def test_anthropic_has_no_embeddings(gw):
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).embeddings.create(model="smart", input="hello")
    assert exc.value.body == {
        "message": "The model 'smart' does not support embeddings: it is served by "
                   "anthropic/claude-sonnet-4-6, and Anthropic has no embeddings API. Use an "
                   "OpenAI, Ollama or OpenAI-compatible embedding model.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_supported"}
    assert gw.anthropic.requests == []
    assert rows(gw, "provider = 'anthropic'")[-1][:3] == [
        "anthropic", "claude-sonnet-4-6", "refused"]


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"model": "fast", "input": []}, "input", "'$.input' is invalid."),
    ({"model": "fast", "input": ["a", 1]}, "input", "'$.input' is invalid."),
    ({"model": "fast", "input": [[]]}, "input", "'$.input' is invalid."),
    ({"model": "fast", "input": 5}, "input", "Invalid type for 'input'"),
    ({"model": "fast"}, "input", "Missing required parameter: 'input'."),
    ({"model": "fast", "input": "a", "encoding_format": "int8"}, "encoding_format",
     "Invalid value: 'int8'. Supported values are: 'float' and 'base64'."),
    ({"model": "fast", "input": "a", "dimensions": 0}, "dimensions", "Invalid 'dimensions'"),
])
def test_wrong_requests_are_refused_at_the_edge(gw, body, param, message):
    r = httpx.post(gw.url + "/v1/embeddings", json=body, timeout=10)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(message)
    assert gw.openai.requests == []


def test_an_unknown_model_is_a_404_and_a_row(gw):
    with pytest.raises(openai.NotFoundError):
        client(gw).embeddings.create(model="no-such-embedder", input="x")
    assert rows(gw, "model = 'no-such-embedder'")[-1][2] == "refused"


# -- an OpenAI-compatible server, and fallbacks across wires -------------------------------------
CONFIG = """\
models:
  embed: ollama/nomic-embed-text
providers:
  vllm: {{kind: openai_compatible, base_url: "{vllm}/v1", api_key_env: VLLM_KEY}}
fallbacks:
  ollama/nomic-embed-text: [openai/text-embedding-3-small]
retry: {{attempts: 1, backoff: 0.05, max_backoff: 1}}
ledger: {{flush_interval: 0.2}}
"""


@pytest.fixture(scope="module")
def compat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    project = tmp_path_factory.mktemp("embeddings")
    fakes = {k: FakeServer(k).start() for k in ("openai", "anthropic", "ollama")}
    vllm = FakeServer("openai").start()
    (project / "flowc.yaml").write_text(textwrap.dedent(CONFIG.format(vllm=vllm.url)))
    env = {**os.environ, "OPENAI_BASE_URL": fakes["openai"].url + "/v1",
           "OPENAI_API_KEY": "sk-test-openai", "ANTHROPIC_BASE_URL": fakes["anthropic"].url,
           "ANTHROPIC_API_KEY": "sk-ant-test", "OLLAMA_HOST": fakes["ollama"].url,
           "VLLM_KEY": "vllm-secret-key", "PYTHONPATH": str(ROOT)}
    port = free_port()
    proc = start_server(project, env, port)
    gw = Gateway(f"http://127.0.0.1:{port}", project, proc, fakes["openai"],
                 fakes["anthropic"], fakes["ollama"], env)
    gw.vllm = vllm  # type: ignore[attr-defined]
    yield gw
    stop_server(proc)
    for f in (*fakes.values(), vllm):
        f.stop()


def test_an_openai_compatible_server_gets_the_request_verbatim(compat):
    compat.vllm.then(openai_embeddings(prompt_tokens=4, model="BAAI/bge-m3"))
    done = client(compat).embeddings.create(model="vllm/BAAI/bge-m3", input="hola")
    assert vectors(done) == [vector_of("hola")]
    sent = compat.vllm.requests[-1]
    assert sent.path == "/v1/embeddings"
    assert sent.headers["authorization"] == "Bearer vllm-secret-key"
    assert sent.body == {"model": "BAAI/bge-m3", "input": "hola", "encoding_format": "base64"}
    row = rows(compat, "provider = 'vllm'")[-1]
    assert row[:4] == ["vllm", "BAAI/bge-m3", "ok", 4]
    assert row[5] is None  # nobody prices it: NULL, never $0


def test_a_failed_ollama_falls_back_to_openai(compat):
    compat.ollama.then(http_error(500, "out of memory", kind="ollama"))
    compat.openai.then(openai_embeddings(prompt_tokens=3))
    done = client(compat).embeddings.create(model="embed", input="x")
    assert vectors(done) == [vector_of("x")]
    assert compat.ollama.requests[-1].body == {"model": "nomic-embed-text", "input": "x"}
    assert compat.openai.requests[-1].body["model"] == "text-embedding-3-small"
    got = rows(compat, "model = 'embed'")
    assert [(r[0], r[2]) for r in got[-2:]] == [("ollama", "error"), ("openai", "ok")]


# -- user-controlled input shapes ---------------------------------------------------------------
TEXT = st.text(min_size=1, max_size=40)
INPUTS = st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=6))
FINITE = st.floats(allow_nan=False, allow_infinity=False)  # JSON has no NaN or infinity
NOT_INPUTS = st.one_of(
    st.integers(), FINITE, st.booleans(), st.just([]),
    st.lists(st.one_of(st.integers(), st.none(), st.booleans(), FINITE,
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
             min_size=1, max_size=4).filter(lambda v: not all(isinstance(x, int) and not
                                                              isinstance(x, bool) for x in v)),
    st.lists(st.just([]), min_size=1, max_size=2),
    st.lists(st.text(max_size=5), min_size=1, max_size=3).map(lambda v: [*v, 7]))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=INPUTS, b64=st.booleans())
def test_any_text_input_comes_back_one_vector_per_input_in_order(gateway, value, b64):
    gateway.reset()
    gateway.ollama.then(ollama_embed())
    r = httpx.post(gateway.url + "/v1/embeddings", timeout=10, json={
        "model": "ollama/all-minilm", "input": value,
        "encoding_format": "base64" if b64 else "float"})
    assert r.status_code == 200, r.text
    texts = [value] if isinstance(value, str) else value
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(texts)))
    for d, text in zip(data, texts, strict=True):
        want = base64_vector(vector_of(text)) if b64 else vector_of(text)
        assert d["embedding"] == want
    assert gateway.ollama.requests[-1].body["input"] == value


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=NOT_INPUTS, model=st.sampled_from(["ollama/all-minilm", "text-embedding-3-small"]))
def test_any_other_input_is_the_clients_400_and_reaches_no_provider(gateway, value, model):
    gateway.reset()
    r = httpx.post(gateway.url + "/v1/embeddings", timeout=10,
                   json={"model": model, "input": value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "input"
    assert gateway.ollama.requests == [] and gateway.openai.requests == []


def test_an_openai_answer_without_data_is_its_failure(gw):
    gw.openai.then(*[json_body({"object": "list"})] * 3)
    with pytest.raises(openai.APIStatusError) as exc:
        client(gw).embeddings.create(model="text-embedding-3-small", input="x")
    assert exc.value.status_code == 502
