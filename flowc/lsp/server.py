"""`flowc lsp`: the compiler as a Language Server, over stdin and stdout.

Diagnostics are `flowc check`'s findings, published as you type (a short pause after the
last change, checked on one worker thread so requests are answered meanwhile). Hover shows
a reference's type and where its value comes from; go-to-definition jumps from a
reference to the step (or input) that defines it; completion offers output names, inputs,
an output's fields and model names.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lsprotocol import types as L
from pygls.lsp.server import LanguageServer
from pygls.uris import from_fs_path, to_fs_path

from flowc import __version__
from flowc.config import CONFIG_NAME
from flowc.diagnostics import Severity
from flowc.lsp import analysis as A
from flowc.lsp.positions import LineIndex

log = logging.getLogger("flowc.lsp")

#: Seconds without a change before a document is checked: one check per pause in typing,
#: not one per keystroke.
DEBOUNCE_S = 0.15

ConfigFindings = tuple[str, str, list[A.Finding]]  # flowc.yaml's uri, text, findings

_KINDS = {
    "output": L.CompletionItemKind.Variable, "input": L.CompletionItemKind.Variable,
    "field": L.CompletionItemKind.Field, "model": L.CompletionItemKind.Value,
    "provider": L.CompletionItemKind.Module, "step": L.CompletionItemKind.Reference,
}


class FlowcServer(LanguageServer):
    """A document store (pygls's, full text on every change) and the compiler's results
    for each open document."""

    def __init__(self) -> None:
        super().__init__("flowc", __version__,
                         text_document_sync_kind=L.TextDocumentSyncKind.Full)
        self.projects = A.Projects()  # used on the checker thread only
        self.checker = ThreadPoolExecutor(1, thread_name_prefix="flowc-check")
        self.pending: dict[str, asyncio.Task[None]] = {}
        self.symbols: dict[str, tuple[int | None, str, A.Symbols | None]] = {}
        self.last_good: dict[str, A.Symbols] = {}  # for completion while the YAML is broken
        self.failed: set[str] = set()  # documents whose check crashed (said once)

    # -- positions -------------------------------------------------------------------------
    def lines(self, text: str) -> LineIndex:
        return LineIndex(text, str(self.workspace.position_encoding or "utf-16"))

    def range(self, lines: LineIndex, start: int, end: int) -> L.Range:
        return L.Range(L.Position(*lines.position(start)), L.Position(*lines.position(end)))

    # -- checking (on the checker thread) --------------------------------------------------
    def check(self, uri: str, text: str) -> tuple[list[A.Finding], list[ConfigFindings]]:
        """The document's findings, and those of a flowc.yaml (re)loaded for it."""
        path = _path(uri)
        if path is not None and path.name == CONFIG_NAME:
            project, _ = self.projects.for_file(path)
            return A.placed(project.diagnostics, text), []
        project, fresh = self.projects.for_file(path)
        found = A.findings(text, str(path) if path else uri, project)
        config = []
        if fresh and project.config_path:
            config_text = Path(project.config_path).read_text("utf-8", errors="replace")
            config.append((from_fs_path(project.config_path) or project.config_path,
                           config_text, A.placed(project.diagnostics, config_text)))
        return found, config

    def build_symbols(self, uri: str, text: str) -> A.Symbols | None:
        path = _path(uri)
        if path is not None and path.name == CONFIG_NAME:
            return None
        project, _ = self.projects.for_file(path)
        return A.symbols(text, str(path) if path else uri, project)

    # -- on the event loop ------------------------------------------------------------------
    def schedule(self, uri: str, delay: float) -> None:
        task = self.pending.pop(uri, None)
        if task is not None:
            task.cancel()
        self.pending[uri] = asyncio.ensure_future(self._check_later(uri, delay))

    async def _check_later(self, uri: str, delay: float) -> None:
        await asyncio.sleep(delay)
        doc = self.workspace.text_documents.get(uri)
        if doc is None:
            return
        text, version = doc.source, doc.version
        try:
            found, configs = await asyncio.get_running_loop().run_in_executor(
                self.checker, self.check, uri, text)
        except Exception as exc:  # a bug in flowc: say so once, keep serving
            self.internal_error(uri, exc)
            return
        self.failed.discard(uri)
        if self.workspace.text_documents.get(uri) is not doc or doc.version != version:
            return  # changed meanwhile: a newer check is on its way
        self.publish(uri, text, found, version)
        for config_uri, config_text, config_found in configs:
            self.publish(config_uri, config_text, config_found)

    def publish(self, uri: str, text: str, found: list[A.Finding],
                version: int | None = None) -> None:
        lines = self.lines(text)
        diagnostics = [
            L.Diagnostic(
                range=self.range(lines, f.start, f.end),
                message=f.diagnostic.message + (f"\nhelp: {f.diagnostic.help}"
                                                if f.diagnostic.help else ""),
                severity=(L.DiagnosticSeverity.Error
                          if f.diagnostic.severity is Severity.ERROR
                          else L.DiagnosticSeverity.Warning),
                code=f.diagnostic.rule, source="flowc")
            for f in found]
        self.text_document_publish_diagnostics(
            L.PublishDiagnosticsParams(uri=uri, diagnostics=diagnostics, version=version))

    def internal_error(self, uri: str, exc: BaseException) -> None:
        log.exception("flowc could not check %s", uri, exc_info=exc)
        if uri in self.failed:
            return
        self.failed.add(uri)
        self.window_show_message(L.ShowMessageParams(
            type=L.MessageType.Error,
            message=f"flowc could not check {uri}: internal error: {type(exc).__name__}: "
                    f"{exc}"[:500] + ". This is a bug in flowc, not in your pipeline: "
                    "please report it with the file that triggers it."))

    async def current(self, uri: str) -> tuple[str, A.Symbols | None]:
        """The document's text and the compiler's tables for it (built once per version)."""
        doc = self.workspace.text_documents.get(uri)
        if doc is None:  # not opened: nothing of it is known (it is not read from disk)
            return "", None
        text, version = doc.source, doc.version
        cached = self.symbols.get(uri)
        if cached is not None and cached[0] == version and cached[1] == text:
            return text, cached[2]
        try:
            sym = await asyncio.get_running_loop().run_in_executor(
                self.checker, self.build_symbols, uri, text)
        except Exception as exc:
            self.internal_error(uri, exc)
            sym = None
        self.symbols[uri] = (version, text, sym)
        if sym is not None:
            self.last_good[uri] = sym
        return text, sym

    def forget(self, uri: str) -> None:
        task = self.pending.pop(uri, None)
        if task is not None:
            task.cancel()
        self.symbols.pop(uri, None)
        self.last_good.pop(uri, None)
        self.failed.discard(uri)


def _path(uri: str) -> Path | None:
    """The file behind a document (None for an unsaved one: no project then)."""
    if not uri.startswith("file:"):
        return None
    fs = to_fs_path(uri)
    return Path(fs) if fs else None


def create_server() -> FlowcServer:
    ls = FlowcServer()

    @ls.feature(L.TEXT_DOCUMENT_DID_OPEN)
    def did_open(params: L.DidOpenTextDocumentParams) -> None:
        ls.schedule(params.text_document.uri, 0)

    @ls.feature(L.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(params: L.DidChangeTextDocumentParams) -> None:
        uri = params.text_document.uri
        path = _path(uri)
        if path is None or path.name != CONFIG_NAME:  # flowc.yaml is read from disk, on save
            ls.schedule(uri, DEBOUNCE_S)

    @ls.feature(L.TEXT_DOCUMENT_DID_SAVE, L.SaveOptions(include_text=False))
    def did_save(params: L.DidSaveTextDocumentParams) -> None:
        uri = params.text_document.uri
        path = _path(uri)
        if path is not None and path.name == CONFIG_NAME:  # every pipeline may change
            for other in list(ls.workspace.text_documents):
                ls.symbols.pop(other, None)
                ls.schedule(other, 0)

    @ls.feature(L.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(params: L.DidCloseTextDocumentParams) -> None:
        uri = params.text_document.uri
        ls.forget(uri)
        ls.text_document_publish_diagnostics(L.PublishDiagnosticsParams(uri=uri, diagnostics=[]))

    @ls.feature(L.TEXT_DOCUMENT_HOVER)
    async def on_hover(params: L.HoverParams) -> L.Hover | None:
        text, sym = await ls.current(params.text_document.uri)
        if sym is None:
            return None
        lines = ls.lines(text)
        found = A.hover(sym, lines.offset(params.position.line, params.position.character))
        if found is None:
            return None
        markdown, start, end = found
        return L.Hover(contents=L.MarkupContent(kind=L.MarkupKind.Markdown, value=markdown),
                       range=ls.range(lines, start, end))

    @ls.feature(L.TEXT_DOCUMENT_DEFINITION)
    async def on_definition(params: L.DefinitionParams) -> L.Location | None:
        uri = params.text_document.uri
        text, sym = await ls.current(uri)
        if sym is None:
            return None
        lines = ls.lines(text)
        found = A.definition(sym, lines.offset(params.position.line,
                                               params.position.character))
        return None if found is None else L.Location(uri=uri, range=ls.range(lines, *found))

    @ls.feature(L.TEXT_DOCUMENT_COMPLETION,
                L.CompletionOptions(trigger_characters=["{", ".", "/", "?"]))
    async def on_completion(params: L.CompletionParams) -> L.CompletionList:
        uri = params.text_document.uri
        text, sym = await ls.current(uri)
        lines = ls.lines(text)
        offset = lines.offset(params.position.line, params.position.character)
        items = A.completions(sym or ls.last_good.get(uri), text, offset)
        return L.CompletionList(is_incomplete=False, items=[
            L.CompletionItem(
                label=i.label, kind=_KINDS[i.kind], detail=i.detail,
                documentation=(L.MarkupContent(kind=L.MarkupKind.Markdown, value=i.documentation)
                               if i.documentation else None),
                text_edit=L.TextEdit(range=ls.range(lines, i.start, i.end), new_text=i.label))
            for i in items])

    @ls.feature(L.SHUTDOWN)
    def on_shutdown(params: None) -> None:
        for task in ls.pending.values():
            task.cancel()
        ls.checker.shutdown(wait=False, cancel_futures=True)

    return ls


def main() -> None:
    """Serve one client over stdin and stdout until it says exit."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="flowc lsp: %(levelname)s: %(message)s")
    create_server().start_io()
