"""The pipelines a server offers: the project's `pipelines/` folder plus those registered over
the API (kept in the ledger's `workflows` table with their YAML and timestamps; with a shared
store, every instance serves what any one registered: `refresh`)."""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowc.compiler import CompileResult, Project, compile_source
from flowc.diagnostics import Diagnostic
from flowc.ir import CompiledPipeline
from runtime.ledger.store import Ledger

if TYPE_CHECKING:
    from runtime.pg.ledger import PgLedger

log = logging.getLogger("flowc.workflows")


@dataclass
class Workflow:
    compiled: CompiledPipeline
    source: str  # "file:pipelines/x.yaml" or "api"
    yaml: str


class Registry:
    def __init__(self, project: Project) -> None:
        self.project = project
        self.workflows: dict[str, Workflow] = {}
        self.broken: dict[str, list[Diagnostic]] = {}

    def load_folder(self, folder: Path) -> None:
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            text = path.read_text(encoding="utf-8", errors="replace")
            result = compile_source(text, str(path), self.project)
            if result.compiled is None:
                self.broken[str(path)] = result.errors
                log.warning("not serving %s: %d errors (run flowc check)", path,
                            len(result.errors))
                continue
            self.workflows[result.compiled.name] = Workflow(result.compiled, f"file:{path}",
                                                            text)

    def load_registered(self, ledger: Ledger | PgLedger) -> None:
        if not ledger.owner:
            return
        for name, text in ledger.execute("SELECT name, config_yaml FROM workflows"):
            self._serve_registered(name, text)

    def _serve_registered(self, name: str, text: str) -> None:
        result = compile_source(text, f"<registered {name}>", self.project)
        if result.compiled is not None:
            self.workflows[result.compiled.name] = Workflow(result.compiled, "api", text)
        else:
            log.warning("not serving registered pipeline %s: %d errors", name,
                        len(result.errors))

    def refresh(self, ledger: Ledger | PgLedger) -> list[str]:
        """Pipelines registered (or changed) by other instances sharing the store, served
        here too; their names. Only a hash of each is read unless it changed."""
        changed = []
        for name, digest in ledger.execute("SELECT name, md5(config_yaml) FROM workflows"):
            wf = self.workflows.get(name)
            if wf is not None and (wf.source != "api" or _md5(wf.yaml) == digest):
                continue  # the project's own file wins over a registered namesake
            rows = ledger.execute("SELECT config_yaml FROM workflows WHERE name = ?", [name])
            if rows:
                self._serve_registered(name, rows[0][0])
                changed.append(name)
        if changed:
            log.info("serving pipelines registered on another instance: %s",
                     ", ".join(changed))
        return changed

    def register(self, name: str, text: str, ledger: Ledger | PgLedger) -> CompileResult:
        """Compile and store a pipeline; refused (the result has errors) if it does not
        compile or its `name:` differs from ``name``."""
        result = compile_source(text, f"<{name}>", self.project)
        if result.compiled is None:
            return result
        if result.compiled.name != name:
            raise ValueError(f"the pipeline's name is '{result.compiled.name}', "
                             f"not '{name}'")
        now = datetime.now(UTC).replace(tzinfo=None)
        ledger.execute(
            "INSERT INTO workflows (id, name, config_yaml, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "config_yaml = excluded.config_yaml, updated_at = excluded.updated_at",
            [uuid.uuid4().hex, name, text, now, now])
        self.workflows[name] = Workflow(result.compiled, "api", text)
        return result

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name, wf in sorted(self.workflows.items()):
            out.append({
                "name": name,
                "description": wf.compiled.pipeline.description,
                "source": wf.source,
                "inputs": {k: v.model_dump(exclude_none=True)
                           for k, v in wf.compiled.inputs.items()},
                "steps": list(wf.compiled.order),
            })
        return out


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()
