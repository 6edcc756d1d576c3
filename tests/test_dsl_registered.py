"""Pipelines registered over HTTP (`PUT /v1/workflows/{name}`) call each other, and the
project's `pipelines/` files, by name: a real `flowc serve` against a loopback OpenAI server,
the ledger's rows read back. Re-registering a callee whose new version would break a caller
is refused with the caller's errors; a compatible one is run by its callers at once."""

from __future__ import annotations

import httpx

from flowc import Project
from flowc.config import ProjectConfig
from runtime.ledger.store import Ledger
from runtime.workflows import BreaksCallers, Registry
from tests.conftest import Gateway
from tests.dsl_b import CONFIG, Answers, execute
from tests.fakes import openai_text, wait_until

CORE = """\
name: {name}
inputs:
  text: {{type: string}}
steps:
  - id: shout
    type: llm
    model: fast
    prompt: "{prompt}: ${{input.text}}"
output: ${{shout}}
"""
CALLER = """\
name: {name}
inputs:
  topic: {{type: string}}
steps:
  - id: call
    type: pipeline
    pipeline: {callee}
    inputs: {{text: "${{input.topic}}"}}
output: ${{call}}
"""


def put(gw: Gateway, name: str, text: str) -> httpx.Response:
    return httpx.put(f"{gw.url}/v1/workflows/{name}", json={"yaml": text}, timeout=60)


def run(gw: Gateway, name: str, inputs: dict) -> dict:
    r = httpx.post(f"{gw.url}/v1/workflow/{name}", json={"input": inputs}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def rows(gw: Gateway, run_id: str) -> list[list]:
    query = ("SELECT step_id, workflow_name, success FROM requests WHERE run_id = "
             f"'{run_id}' ORDER BY step_id")
    wait_until(lambda: bool(gw.sql(query)))
    return gw.sql(query)


def test_a_registered_pipeline_calls_another_by_name(gw):
    assert put(gw, "core-a", CORE.format(name="core-a", prompt="Shout")).status_code == 200
    r = put(gw, "caller-a", CALLER.format(name="caller-a", callee="core-a"))
    assert r.status_code == 200, r.text
    out = run(gw, "caller-a", {"topic": "owls"})
    assert out["status"] == "succeeded", out
    assert out["output"] == "echo: Shout: owls"
    nested = out["metrics"]["steps"][0]["steps"]
    assert [(s["id"], s["status"]) for s in nested] == [("shout", "done")]
    # The callee's call is on the books under the caller's run and workflow.
    assert rows(gw, out["run_id"]) == [["call/shout", "caller-a", True]]


def test_re_registering_a_callee_that_breaks_its_caller_is_refused(gw):
    assert put(gw, "core-b", CORE.format(name="core-b", prompt="Shout")).status_code == 200
    assert put(gw, "caller-b", CALLER.format(name="caller-b", callee="core-b")).status_code \
        == 200
    renamed = CORE.format(name="core-b", prompt="Whisper").replace("text", "words")
    r = put(gw, "core-b", renamed)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "breaks_callers"
    assert "called by 'caller-b'" in error["message"]
    assert [(d["pipeline"], d["rule"], d["message"]) for d in error["diagnostics"]] == [
        ("caller-b", "pipeline-inputs", "pipeline 'core-b' needs input 'words'"),
        ("caller-b", "pipeline-inputs", "pipeline 'core-b' has no input 'text'")]
    # Nothing changed: the stored version and what the caller runs are the old ones.
    stored = gw.sql("SELECT config_yaml FROM workflows WHERE name = 'core-b'")
    assert stored == [[CORE.format(name="core-b", prompt="Shout")]]
    assert run(gw, "caller-b", {"topic": "owls"})["output"] == "echo: Shout: owls"
    # A compatible version is taken, and its callers run it from then on.
    r = put(gw, "core-b", CORE.format(name="core-b", prompt="Whisper"))
    assert r.status_code == 200, r.text
    assert run(gw, "caller-b", {"topic": "owls"})["output"] == "echo: Whisper: owls"


def test_registered_pipelines_calling_each_other_in_a_cycle_are_refused(gw):
    assert put(gw, "pong", CORE.format(name="pong", prompt="Pong")).status_code == 200
    assert put(gw, "ping", CALLER.format(name="ping", callee="pong")).status_code == 200
    r = put(gw, "pong", CALLER.format(name="pong", callee="ping"))
    assert r.status_code == 422
    assert [(d["rule"], d["message"]) for d in r.json()["error"]["diagnostics"]] == [
        ("pipeline-cycle", "pipelines call each other in a cycle: pong -> ping -> pong")]
    assert run(gw, "ping", {"topic": "x"})["output"] == "echo: Pong: x"


def test_an_unknown_name_says_where_it_looked(gw):
    r = put(gw, "lost", CALLER.format(name="lost", callee="nowhere"))
    assert r.status_code == 422
    assert [(d["rule"], d["message"]) for d in r.json()["error"]["diagnostics"]] == [
        ("pipeline-not-found", "pipeline 'nowhere' not found: no such file, none is served "
                               "by that name, and no pipeline file in the project's "
                               f"pipelines folder {gw.project / 'pipelines'} has "
                               "`name: nowhere`")]


def test_files_and_registered_pipelines_call_each_other_by_name(tmp_path):
    """A `pipelines/` file calls a registered pipeline (loaded after the files, as a server
    starts) and a registered pipeline calls a file; both run, their calls on the books."""
    core = CORE.replace("model: fast", "model: m")  # tests/dsl_b.py's model
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "front.yaml").write_text(CALLER.format(name="front", callee="kept"))
    (folder / "core.yaml").write_text(core.format(name="core", prompt="Core"))
    ledger = Ledger(tmp_path / "registry.duckdb", 0.1)
    try:
        ledger.execute("INSERT INTO workflows (id, name, config_yaml, created_at, updated_at) "
                       "VALUES ('1', 'kept', ?, now(), now())",
                       [core.format(name="kept", prompt="Kept")])
        registry = Registry(Project(config=ProjectConfig.model_validate(CONFIG)))
        registry.load_folder(folder)
        assert str(folder / "front.yaml") in registry.broken  # `kept` is not known yet
        registry.load_registered(ledger)
        assert sorted(registry.workflows) == ["core", "front", "kept"]
        assert registry.broken == {}
        registry.register("back", CALLER.format(name="back", callee="core"), ledger)
        # A file may not be changed over the API, but a callee its callers rely on can't
        # change under them either: re-registering `kept` incompatibly is refused.
        try:
            registry.register("kept", core.format(name="kept", prompt="K").replace(
                "text", "t"), ledger)
            raise AssertionError("not refused")
        except BreaksCallers as exc:
            assert list(exc.errors) == ["front"]
    finally:
        ledger.close()
    from tests.fakes import FakeServer

    fake = FakeServer("openai").start()
    try:
        Answers({"Core|Kept": [lambda rec: openai_text("ok")(rec)]}).serve(fake)
        for name, step in (("front", "call/shout"), ("back", "call/shout")):
            (tmp_path / name).mkdir()
            result, books = execute(registry.workflows[name].compiled, {"topic": "t"}, fake,
                                    tmp_path / name)
            assert result.status == "succeeded", result.error
            assert result.output == "ok"
            assert books == [(step, name, True, result.run_id)]
    finally:
        fake.stop()


def _seeded_project(tmp_path, files: dict[str, str], registered: dict[str, str]):
    """A project with ``files`` in pipelines/ and ``registered`` pipelines already in its
    ledger (put there by an earlier server), and a loopback OpenAI that echoes prompts."""
    from tests.fakes import FakeServer

    (tmp_path / "flowc.yaml").write_text("models: {fast: openai/gpt-4o-mini}\n"
                                         "ledger: {flush_interval: 0.2}\n")
    (tmp_path / "pipelines").mkdir()
    for name, text in files.items():
        (tmp_path / "pipelines" / name).write_text(text)
    (tmp_path / ".flowc").mkdir()
    ledger = Ledger(tmp_path / ".flowc" / "ledger.duckdb", 0.1)
    try:
        for name, text in registered.items():
            ledger.execute("INSERT INTO workflows (id, name, config_yaml, created_at, "
                           "updated_at) VALUES (?, ?, ?, now(), now())", [name, name, text])
    finally:
        ledger.close()
    return FakeServer("openai").start()


def _serve(tmp_path, fake):
    import os

    from tests.conftest import ROOT, start_server
    from tests.fakes import free_port

    env = {**os.environ, "OPENAI_BASE_URL": fake.url + "/v1", "OPENAI_API_KEY": "sk-test",
           "PYTHONPATH": str(ROOT)}
    port = free_port()
    return f"http://127.0.0.1:{port}", start_server(tmp_path, env, port)


def test_a_pipelines_file_wins_over_a_registered_namesake_and_a_put_of_it_is_refused(
        tmp_path):
    """The rule: a name a file in the project's pipelines/ has is that file's. At start-up
    the file is served, not the pipeline registered under its name before the file came;
    a PUT of that name is a 409 that says so, and changes nothing."""
    from tests.conftest import stop_server

    file_text = CORE.format(name="dup", prompt="From the file")
    fake = _seeded_project(tmp_path, {"dup.yaml": file_text},
                           {"dup": CORE.format(name="dup", prompt="Registered")})
    url, proc = _serve(tmp_path, fake)
    try:
        r = httpx.post(f"{url}/v1/workflow/dup", json={"input": {"text": "x"}}, timeout=60)
        assert r.status_code == 200 and r.json()["output"] == "echo: From the file: x", r.text
        listed = httpx.get(f"{url}/v1/workflows", timeout=30).json()["workflows"]
        assert [w["source"] for w in listed if w["name"] == "dup"] == [
            f"file:{tmp_path / 'pipelines' / 'dup.yaml'}"]
        r = httpx.put(f"{url}/v1/workflows/dup", timeout=30,
                      json={"yaml": CORE.format(name="dup", prompt="Put")})
        assert r.status_code == 409, r.text
        assert r.json()["error"] == {
            "message": f"pipeline 'dup' is the project's file "
                       f"{tmp_path / 'pipelines' / 'dup.yaml'}, which wins over a "
                       "registered pipeline of that name: change the file, or register "
                       "this one under another name",
            "type": "invalid_request_error", "code": "workflow_is_a_file", "param": None}
        r = httpx.post(f"{url}/v1/workflow/dup", json={"input": {"text": "x"}}, timeout=60)
        assert r.json()["output"] == "echo: From the file: x"
    finally:
        stop_server(proc)
        fake.stop()


def test_a_refresh_keeps_the_rule_a_file_wins(tmp_path):
    """With a shared store, another instance may register (or change) a pipeline under a
    file's name: an instance that has the file keeps serving it at each refresh, one without
    the file serves the registered one, as each would at start-up."""
    core = CORE.replace("model: fast", "model: m")
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "dup.yaml").write_text(core.format(name="dup", prompt="File"))
    ledger = Ledger(tmp_path / "registry.duckdb", 0.1)
    try:
        project = Project(config=ProjectConfig.model_validate(CONFIG))
        with_file, without = Registry(project), Registry(project)
        with_file.load_folder(folder)
        for registry in (with_file, without):
            registry.load_registered(ledger)
        without.register("dup", core.format(name="dup", prompt="Registered"), ledger)
        assert with_file.refresh(ledger) == []
        assert "File" in with_file.workflows["dup"].yaml
        ledger.execute("UPDATE workflows SET config_yaml = ? WHERE name = 'dup'",
                       [core.format(name="dup", prompt="Changed")])
        assert (with_file.refresh(ledger), without.refresh(ledger)) == ([], ["dup"])
        assert "File" in with_file.workflows["dup"].yaml
        assert "Changed" in without.workflows["dup"].yaml
        restarted = Registry(project)  # start-up: the same rule
        restarted.load_folder(folder)
        restarted.load_registered(ledger)
        assert restarted.workflows["dup"].source == f"file:{folder / 'dup.yaml'}"
    finally:
        ledger.close()


def test_a_registered_pipeline_finds_a_relative_path_in_the_pipelines_folder(tmp_path):
    """A registered pipeline has no file of its own: its `pipeline: ./x.yaml` is looked up in
    the project's pipelines/ folder, as if it were one of its files there, never in the
    directory the server happened to start in (here: the project, with a decoy x.yaml)."""
    from tests.conftest import stop_server

    callee = CORE.format(name="callee", prompt="Pipelines folder")
    by_path = CALLER.replace("{callee}", "./callee.yaml").replace("{name}", "{0}")
    fake = _seeded_project(tmp_path, {"callee.yaml": callee},
                           {"seeded": by_path.format("seeded")})
    (tmp_path / "callee.yaml").write_text(CORE.format(name="callee", prompt="Server cwd"))
    url, proc = _serve(tmp_path, fake)
    try:
        r = httpx.put(f"{url}/v1/workflows/put", json={"yaml": by_path.format("put")},
                      timeout=30)
        assert r.status_code == 200, r.text
        for name in ("seeded", "put"):  # compiled at start-up, and on a PUT
            r = httpx.post(f"{url}/v1/workflow/{name}", json={"input": {"topic": "x"}},
                           timeout=60)
            assert r.json()["output"] == "echo: Pipelines folder: x", r.text
        missing = CALLER.format(name="lost", callee="./nowhere.yaml")
        r = httpx.put(f"{url}/v1/workflows/lost", json={"yaml": missing}, timeout=30)
        assert r.status_code == 422
        [d] = r.json()["error"]["diagnostics"]
        assert (d["rule"], d["message"], d["help"]) == (
            "pipeline-not-found", "pipeline './nowhere.yaml' not found: no such file in "
            f"the project's pipelines folder {tmp_path / 'pipelines'} (a registered pipeline "
            "is looked up as if it were a file there)",
            "give a path relative to the pipelines folder (./summarize.yaml) or a "
            "pipeline's name")
    finally:
        stop_server(proc)
        fake.stop()


BOTH = """\
name: both
inputs:
  topic: {type: string}
steps:
  - id: pair
    type: block
    steps:
      - id: by_path
        type: pipeline
        pipeline: ./callee.yaml
        inputs: {text: "${input.topic}"}
      - id: by_name
        type: pipeline
        pipeline: kept
        inputs: {text: "${input.topic}"}
    output: {path: "${by_path}", name: "${by_name}"}
output: ${pair}
"""


def test_a_blocks_pipeline_steps_find_callees_as_the_pipelines_own_steps_do(
        tmp_path, monkeypatch):
    """Inside a block of a registered pipeline, `pipeline: ./x.yaml` is the project's
    pipelines/ file (not a decoy in the directory the server started in) and a name is a
    registered pipeline's: as for a step at the top level. Both run, on the books."""
    from tests.fakes import FakeServer

    core = CORE.replace("model: fast", "model: m")
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "callee.yaml").write_text(core.format(name="callee", prompt="Pipelines folder"))
    (tmp_path / "callee.yaml").write_text(core.format(name="callee", prompt="Server cwd"))
    monkeypatch.chdir(tmp_path)
    ledger = Ledger(tmp_path / "registry.duckdb", 0.1)
    try:
        registry = Registry(Project(config=ProjectConfig.model_validate(CONFIG),
                                    pipelines_dir=folder))
        assert registry.register("kept", core.format(name="kept", prompt="Kept"),
                                 ledger).ok
        result = registry.register("both", BOTH, ledger)
        assert result.ok, [str(d) for d in result.diagnostics]
    finally:
        ledger.close()
    fake = FakeServer("openai").start()
    try:
        Answers({".": [lambda rec: openai_text(rec.body["messages"][-1]["content"])(rec)]}
                ).serve(fake)
        out, books = execute(registry.workflows["both"].compiled, {"topic": "t"}, fake,
                             tmp_path)
    finally:
        fake.stop()
    assert out.status == "succeeded", out.error
    assert out.output == {"path": "Pipelines folder: t", "name": "Kept: t"}
    assert books == [("pair/by_name/shout", "both", True, out.run_id),
                     ("pair/by_path/shout", "both", True, out.run_id)]
