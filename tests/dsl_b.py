"""What the tests of for_each, sub-pipelines and repeat share: pipelines written to files,
compiled as `flowc check` does, run on the real model-call path against a loopback OpenAI
server, with the ledger's rows read back."""

from __future__ import annotations

import asyncio
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowc import Project, compile_file
from flowc.config import ProjectConfig
from runtime.executor import Executor, RunResult
from runtime.gateway.calls import ModelCaller
from runtime.gateway.routing import Router
from runtime.ledger.store import Ledger
from runtime.providers import Providers
from tests.fakes import FakeServer, Recorded, openai_text

CONFIG = {"models": {"m": "openai/gpt-4o-mini"}, "retry": {"attempts": 0}}


def project() -> Project:
    return Project(config=ProjectConfig.model_validate(CONFIG))


def write(folder: Path, **files: str) -> Path:
    """Write ``name=yaml`` files (``sub_x`` -> ``sub_x.yaml``); returns the first's path."""
    paths = []
    for name, text in files.items():
        path = folder / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        paths.append(path)
    return paths[0]


def compiled_at(path: Path) -> Any:
    result = compile_file(path, project())
    assert result.compiled is not None, [str(d) for d in result.diagnostics]
    return result.compiled


def diagnostics(path: Path) -> list[tuple[str, str]]:
    return [(d.rule, d.message) for d in compile_file(path, project()).diagnostics]


def execute(compiled: Any, inputs: dict[str, Any], fake: FakeServer, tmp_path: Path,
            **kw: Any) -> tuple[RunResult, list[tuple]]:
    """Run on the real path; the ledger's rows (step_id, workflow_name, success, run_id)."""
    async def go() -> tuple[RunResult, list[tuple]]:
        config = ProjectConfig.model_validate(CONFIG)
        providers = Providers(config, env={"OPENAI_BASE_URL": fake.url + "/v1",
                                           "OPENAI_API_KEY": "k"})
        ledger = Ledger(tmp_path / "ledger.duckdb", 0.1)
        try:
            caller = ModelCaller(config, providers, Router(config, providers), ledger)
            result = await Executor(caller, **kw).run(compiled, inputs)
            ledger.flush()
            rows = ledger.select("SELECT step_id, workflow_name, success, run_id "
                                 "FROM requests ORDER BY step_id")[1]
            return result, [tuple(r) for r in rows]
        finally:
            await providers.close()
            ledger.close()

    return asyncio.run(go())


class Answers:
    """A loopback model that answers by the prompt: the first pattern that matches the last
    user message picks its list of actions, taken in turn (the last one repeats). It keeps
    the most calls it had in flight at once."""

    def __init__(self, rules: dict[str, list[Callable[[Recorded], Any]]],
                 delay: float = 0.0) -> None:
        self.rules = {re.compile(k): list(v) for k, v in rules.items()}
        self.delay = delay
        self.in_flight = 0
        self.peak = 0
        self.prompts: list[str] = []

    def __call__(self, rec: Recorded) -> Any:
        return self._answer(rec)

    async def _answer(self, rec: Recorded) -> Any:
        text = rec.body["messages"][-1]["content"]
        self.prompts.append(text)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            for pattern, actions in self.rules.items():
                if pattern.search(text):
                    action = actions.pop(0) if len(actions) > 1 else actions[0]
                    result = action(rec)
                    return await result if asyncio.iscoroutine(result) else result
            return openai_text(f"echo: {text}")(rec)
        finally:
            self.in_flight -= 1

    def serve(self, fake: FakeServer, calls: int = 200) -> None:
        fake.requests.clear()
        fake.script.clear()
        fake.then(*[self] * calls)
