"""Keys that cannot be used: missing, malformed, unknown, revoked and expired keys are a 401
in the client's own dialect (OpenAI's on /v1/chat/completions, Anthropic's on /v1/messages),
never a traceback, and no secret reaches the server's log. The official SDKs see them as
their AuthenticationError."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from tests.keyed import ADMIN, Keyed, close, keyed

CONFIG = """\
models:
  fast: openai/gpt-4o-mini
ledger:
  flush_interval: 0.1
"""
CHAT = {"model": "fast", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "claude-sonnet-4-6", "max_tokens": 20,
            "messages": [{"role": "user", "content": "hi"}]}
UNKNOWN = "sk-flowc-" + "Q" * 43


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    k = keyed(tmp_path_factory.mktemp("auth"), CONFIG)
    k.keys({"name": "good"}, {"name": "gone"}, {"name": "old"},
           {"name": "narrow", "models": ["fast"]}, revoked=("gone",),
           expired=("old",))
    k.start("--log-level", "info")  # refusals are logged at info: the log is read below
    yield k
    k.stop()
    close(k)


def credentials(srv: Keyed) -> dict[str, tuple[dict[str, str], str]]:
    """What a client may send, and the error code it gets."""
    gone, old = srv.secrets["gone"], srv.secrets["old"]
    return {
        "missing": ({}, "missing_api_key"),
        "empty bearer": ({"authorization": "Bearer"}, "missing_api_key"),
        "basic auth": ({"authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key"),
        "no scheme": ({"authorization": srv.secrets["good"][:20]}, "missing_api_key"),
        "not a flowc key": ({"authorization": "Bearer sk-proj-abc123"}, "invalid_api_key"),
        "odd bytes": ({"authorization": "Bearer sk-flowc-\u00e9\u00ff\t!"}, "invalid_api_key"),
        "truncated": ({"authorization": "Bearer " + srv.secrets["good"][:-1]},
                      "invalid_api_key"),
        "unknown": ({"x-api-key": UNKNOWN}, "invalid_api_key"),
        "revoked": ({"authorization": f"Bearer {gone}"}, "revoked_api_key"),
        "revoked x-api-key": ({"x-api-key": gone}, "revoked_api_key"),
        "expired": ({"authorization": f"Bearer {old}"}, "expired_api_key"),
    }


@pytest.mark.parametrize("case", ["missing", "empty bearer", "basic auth", "no scheme",
                                  "not a flowc key", "odd bytes", "truncated", "unknown",
                                  "revoked", "revoked x-api-key", "expired"])
def test_an_unusable_key_is_a_401_in_each_dialect(srv, case):
    headers, code = credentials(srv)[case]
    before = len(srv.openai.requests) + len(srv.anthropic.requests)
    r = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30,
                   headers={k: v.encode("latin-1") for k, v in headers.items()})
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error", err
    assert err["message"] and "Traceback" not in r.text
    r = httpx.post(srv.url + "/v1/messages", json=MESSAGES, timeout=30,
                   headers={"anthropic-version": "2023-06-01",
                            **{k: v.encode("latin-1") for k, v in headers.items()}})
    assert r.status_code == 401, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert body["error"]["message"] == err["message"]
    assert len(srv.openai.requests) + len(srv.anthropic.requests) == before  # nothing sent


def test_a_revoked_or_expired_key_is_named_without_its_secret(srv):
    r = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30,
                   headers=srv.auth("gone"))
    msg = r.json()["error"]["message"]
    assert msg == f"This API key was revoked (key 'gone', {srv.ids['gone']})."
    r = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30,
                   headers=srv.auth("old"))
    assert r.json()["error"]["message"] == \
        f"This API key was expired (key 'old', {srv.ids['old']})."


def test_health_needs_no_key_and_a_good_key_or_the_admin_key_calls_models(srv):
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
    for token in (srv.secrets["good"], ADMIN):
        r = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30,
                       headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text


def test_the_sdks_raise_authentication_error_for_a_bad_key_and_work_with_a_good_one(srv):
    good = openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.secrets["good"],
                         max_retries=0)
    assert good.chat.completions.create(**CHAT).choices[0].message.content  # type: ignore[call-overload]
    for secret in (UNKNOWN, srv.secrets["gone"], srv.secrets["old"]):
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=secret, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        assert err.value.status_code == 401 and err.value.code.endswith("_api_key")
    claude = anthropic.Anthropic(base_url=srv.url, api_key=srv.secrets["good"], max_retries=0)
    assert claude.messages.create(**MESSAGES).content  # type: ignore[call-overload]
    for secret in (UNKNOWN, srv.secrets["gone"], srv.secrets["old"]):
        client = anthropic.Anthropic(base_url=srv.url, api_key=secret, max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as aerr:
            client.messages.create(**MESSAGES)  # type: ignore[call-overload]
        assert aerr.value.status_code == 401


def test_no_secret_reaches_the_log(srv):
    # Runs last in the module: the server is stopped and its whole log read.
    out = srv.stop()
    assert "refused POST /v1/chat/completions: invalid_api_key" in out  # refusals are logged
    assert "revoked key" in out
    for secret in (*srv.secrets.values(), UNKNOWN, ADMIN):
        assert secret not in out
    assert srv.secrets["good"][:20] not in out
    assert "Traceback" not in out
    srv.start("--log-level", "info")  # for the fixture's own stop


def test_a_key_limited_to_some_models_lists_only_those(srv):
    def client(name: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.secrets[name], max_retries=0)

    everything = {m.id for m in client("good").models.list()}
    assert {"fast", "openai/gpt-4o-mini"} <= everything
    assert {m.id for m in client("narrow").models.list()} == {"fast"}
    assert client("narrow").models.retrieve("fast").id == "fast"
    with pytest.raises(openai.NotFoundError, match="does not exist or you do not have access"):
        client("narrow").models.retrieve("openai/gpt-4o-mini")
    assert client("good").models.retrieve("openai/gpt-4o-mini").id == "openai/gpt-4o-mini"
