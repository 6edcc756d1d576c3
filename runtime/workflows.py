"""The pipelines a server offers: the project's `pipelines/` folder plus those registered over
the API (kept in the ledger's `workflows` table with their YAML and timestamps; with a shared
store, every instance serves what any one registered: `refresh`)."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import uuid
from dataclasses import dataclass, replace
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

    @property
    def label(self) -> str:
        """What its findings name: its file, or `<registered name>`."""
        return self.source[5:] if self.source.startswith("file:") \
            else f"<registered {self.compiled.name}>"


class BreaksCallers(ValueError):
    """Registering a pipeline would break pipelines that call it (by name): their errors,
    as compiled against the new version."""

    def __init__(self, name: str, errors: dict[str, list[Diagnostic]]) -> None:
        self.errors = errors
        super().__init__(
            f"pipeline '{name}' is called by {', '.join(map(repr, errors))}, which would not "
            "compile against this version (see `diagnostics`); change them first, or keep "
            "its inputs and output compatible")


class NameIsAFile(ValueError):
    """Registering a pipeline under the name a file in the project's pipelines/ has: the file
    wins (`Registry.file_of`), so the registration would never be served here."""

    def __init__(self, name: str, path: Path) -> None:
        super().__init__(
            f"pipeline '{name}' is the project's file {path}, which wins over a registered "
            "pipeline of that name: change the file, or register this one under another name")


_NAME = re.compile(r"^name:\s*[\"']?([A-Za-z0-9][A-Za-z0-9_.-]*)[\"']?\s*(#.*)?$", re.M)


class Registry:
    def __init__(self, project: Project) -> None:
        # `type: pipeline` steps may name any pipeline served here, registered ones too.
        self.project = replace(project, pipelines=self.source_of)
        self.workflows: dict[str, Workflow] = {}
        self.broken: dict[str, list[Diagnostic]] = {}
        self._pending: dict[str, tuple[str, str]] = {}  # known before served: loading, a PUT
        self.files: dict[str, Path] = {}  # name -> the pipelines/ file that has it
        self._lock = threading.RLock()  # one registration (and its callers' check) at a time

    def source_of(self, name: str) -> tuple[str, str] | None:
        """A pipeline's YAML and label by name, for a caller's `pipeline: name`."""
        if name in self._pending:
            return self._pending[name]
        wf = self.workflows.get(name)
        return None if wf is None else (wf.yaml, wf.label)

    def load_folder(self, folder: Path) -> None:
        paths = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
        texts = {path: path.read_text(encoding="utf-8", errors="replace") for path in paths}
        for path, text in texts.items():  # files may call each other by name, in any order
            if (m := _NAME.search(text)) is not None:
                self._pending.setdefault(m.group(1), (text, str(path)))
                self.files.setdefault(m.group(1), path)
        try:
            for path, text in texts.items():
                self._load_file(path, text)
        finally:
            self._pending.clear()

    def _load_file(self, path: Path, text: str) -> None:
        result = compile_source(text, str(path), self.project)
        if result.compiled is None:
            self.broken[str(path)] = result.errors
            log.warning("not serving %s: %d errors (run flowc check)", path,
                        len(result.errors))
            return
        self.broken.pop(str(path), None)
        self.files.setdefault(result.compiled.name, path)
        self.workflows[result.compiled.name] = Workflow(result.compiled, f"file:{path}", text)

    def file_of(self, name: str) -> Path | None:
        """The file in the project's pipelines/ that has `name: <name>`, if one does. The
        rule (docs/runtime.md): such a name is the file's. A pipeline registered under it is
        not served here, at start-up or on a refresh, and a PUT of it is refused: the file is
        what the project's repository says, and an API call must not silently replace it."""
        return self.files.get(name)

    def load_registered(self, ledger: Ledger | PgLedger) -> None:
        if not ledger.owner:
            return
        rows = ledger.execute("SELECT name, config_yaml FROM workflows")
        self._pending.update({name: (text, f"<registered {name}>") for name, text in rows
                              if self.file_of(name) is None})
        try:
            for name, text in rows:
                self._serve_registered(name, text)
        finally:
            self._pending.clear()
        for path in list(self.broken):  # a file may call a registered pipeline by name
            file = Path(path)
            if file.is_file():
                self._load_file(file, file.read_text(encoding="utf-8", errors="replace"))

    def _serve_registered(self, name: str, text: str) -> None:
        if (path := self.file_of(name)) is not None:
            log.warning("not serving registered pipeline %s: the project's file %s has that "
                        "name, and a file wins", name, path)
            return
        result = compile_source(text, f"<registered {name}>", self.project)
        if result.compiled is not None:
            self.workflows[result.compiled.name] = Workflow(result.compiled, "api", text)
            if not self._pending:  # served anew while serving: its callers run the new one
                self._recompile_callers(name)
        else:
            log.warning("not serving registered pipeline %s: %d errors", name,
                        len(result.errors))

    def refresh(self, ledger: Ledger | PgLedger) -> list[str]:
        """Pipelines registered (or changed) by other instances sharing the store, served
        here too; their names. Only a hash of each is read unless it changed."""
        changed = []
        for name, digest in ledger.execute("SELECT name, md5(config_yaml) FROM workflows"):
            wf = self.workflows.get(name)
            if self.file_of(name) is not None or (wf is not None and _md5(wf.yaml) == digest):
                continue
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
        compile or its `name:` differs from ``name``, and (BreaksCallers) if a pipeline served
        here that calls it, directly or through others, would not compile against it. Those
        callers are compiled again against it, so their runs run the new version."""
        with self._lock:
            if (path := self.file_of(name)) is not None:
                raise NameIsAFile(name, path)
            result = compile_source(text, f"<{name}>", self.project)
            if result.compiled is None:
                return result
            if result.compiled.name != name:
                raise ValueError(f"the pipeline's name is '{result.compiled.name}', "
                                 f"not '{name}'")
            self._pending[name] = (text, f"<registered {name}>")
            try:
                callers, broken = self._compile_callers(name)
            finally:
                self._pending.pop(name, None)
            if broken:
                raise BreaksCallers(name, broken)
            now = datetime.now(UTC).replace(tzinfo=None)
            ledger.execute(
                "INSERT INTO workflows (id, name, config_yaml, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "config_yaml = excluded.config_yaml, updated_at = excluded.updated_at",
                [uuid.uuid4().hex, name, text, now, now])
            self.workflows[name] = Workflow(result.compiled, "api", text)
            self.workflows.update(callers)
            return result

    def _compile_callers(self, name: str) -> tuple[dict[str, Workflow],
                                                   dict[str, list[Diagnostic]]]:
        """The served pipelines that call ``name`` (at any depth), compiled again as the
        resolver now gives it; those that no longer compile apart, with their errors."""
        done: dict[str, Workflow] = {}
        broken: dict[str, list[Diagnostic]] = {}
        for caller, wf in sorted(self.workflows.items()):
            if caller == name or name not in calls(wf.compiled):
                continue
            result = compile_source(wf.yaml, wf.label, self.project)
            if result.compiled is None:
                broken[caller] = result.errors
            else:
                done[caller] = Workflow(result.compiled, wf.source, wf.yaml)
        return done, broken

    def _recompile_callers(self, name: str) -> None:
        """Another instance registered ``name``: it checked the callers there; here each one
        that still compiles runs the new version, and one that does not keeps its old one."""
        callers, broken = self._compile_callers(name)
        self.workflows.update(callers)
        for caller, errors in broken.items():
            log.warning("pipeline %s calls %s, registered anew, and no longer compiles "
                        "(%s); it runs the version it was compiled with", caller, name,
                        errors[0].message)

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


def calls(compiled: CompiledPipeline) -> set[str]:
    """The names of the pipelines ``compiled`` calls, directly or through others."""
    out: set[str] = set()
    for sid in compiled.order:
        callee = compiled.node(sid).callee
        if callee is not None and callee.name not in out:
            out |= {callee.name, *calls(callee)}
    return out


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()
