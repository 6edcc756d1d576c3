"""YAML loading that remembers where every value came from.

PyYAML's composer gives each node a start and end mark; we turn the node tree into plain
Python values and keep a map from each value's path (``("steps", 0, "prompt")``) to its
span in the file, so every diagnostic can point at the right line and column.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any, NamedTuple

import yaml

try:  # libyaml is ~10x faster and keeps the same marks
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Loader = yaml.SafeLoader

Path = tuple[str | int, ...]
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"

#: What aliases may add to a file when expanded (the values and the text of the values they
#: repeat), and how deeply collections may nest. Past either, the file is refused at the
#: offending alias or collection: a few hundred bytes of nested aliases expand to a billion
#: values, and a deep enough nesting overflows the YAML library's stack.
MAX_ALIAS_VALUES = 100_000
MAX_ALIAS_TEXT = 10_000_000
MAX_DEPTH = 64
_COMPOSER_SAFE_DEPTH = 20_000  # libyaml's composer recurses in C: 40,000 levels were fine
_LEADING = re.compile(rf"^[ \t?:-]{{{_COMPOSER_SAFE_DEPTH // 2}}}", re.MULTILINE)


@dataclass(frozen=True)
class Position:
    """A 1-based line and column."""

    line: int
    col: int


class Span(NamedTuple):  # a NamedTuple: files have tens of thousands, built fast
    start: int  # absolute character offsets into the source
    end: int
    style: str | None = None  # YAML scalar style: None (plain), '"', "'", '|', '>'


class YamlError(Exception):
    """The file is not valid YAML (``rule`` yaml-syntax), or goes past the loader's limits
    (yaml-alias, yaml-nesting)."""

    def __init__(self, message: str, offset: int, rule: str = "yaml-syntax",
                 end: int | None = None, help: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.rule = rule
        self.end = end
        self.help = help


@dataclass
class SourceFile:
    """The text of one file plus the spans of every value and mapping key in it."""

    path: str
    text: str
    values: dict[Path, Span] = field(default_factory=dict)
    keys: dict[Path, Span] = field(default_factory=dict)
    duplicate_keys: list[tuple[str, int]] = field(default_factory=list)  # (key, offset)
    # Files read along with this one (prompt files): each at a base offset past this text,
    # so a span in one is an offset like any other and a finding names its own file.
    attachments: list[tuple[int, SourceFile]] = field(default_factory=list)
    _line_starts: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        starts = [0]
        for i, ch in enumerate(self.text):
            if ch == "\n":
                starts.append(i + 1)
        self._line_starts = starts

    @classmethod
    def read(cls, path: str | FsPath) -> SourceFile:
        raw = FsPath(path).read_bytes()
        return cls(str(path), raw.decode("utf-8", errors="replace"))

    def attach(self, other: SourceFile) -> int:
        """Read ``other`` along with this file; returns the base offset of its text."""
        last = self.attachments[-1] if self.attachments else None
        base = (last[0] + len(last[1].text) + 1) if last else len(self.text) + 1
        self.attachments.append((base, other))
        return base

    def locate(self, offset: int) -> tuple[SourceFile, int]:
        """The file an offset is in (this one or an attachment) and the offset in it."""
        for base, other in reversed(self.attachments):
            if offset >= base:
                return other, offset - base
        return self, offset

    # -- positions -------------------------------------------------------------------------
    def position(self, offset: int) -> Position:
        offset = max(0, min(offset, len(self.text)))
        line = bisect.bisect_right(self._line_starts, offset) - 1
        return Position(line + 1, offset - self._line_starts[line] + 1)

    def span_of(self, path: Path, *, key: bool = False) -> Span:
        """The span of the value at ``path`` (or of its key), falling back to the nearest
        enclosing value that has one."""
        table = self.keys if key else self.values
        p = tuple(path)
        while p:
            if p in table:
                return table[p]
            if key and p in self.values:
                return self.values[p]
            p = p[:-1]
            table = self.values
        return self.values.get((), Span(0, 0))

    def span_in_value(self, path: Path, value: str, offset: int, length: int) -> Span:
        """The span of ``value[offset:offset+length]`` in the source, where ``value`` is the
        scalar stored at ``path``.

        The piece is found by text, which is exact for plain, quoted and literal (``|``)
        scalars whatever their indentation; where the text was folded or escaped beyond
        recognition we fall back to the start of the scalar.
        """
        whole = self.values.get(tuple(path))
        if whole is None:
            return self.span_of(path)
        piece = value[offset : offset + length]
        nth = value.count(piece, 0, offset) if piece else 0
        raw = self.text[whole.start : whole.end]
        at = -1
        for _ in range(nth + 1):
            at = raw.find(piece, at + 1)
            if at < 0:
                return Span(whole.start, whole.start + 1)
        return Span(whole.start + at, whole.start + at + max(1, len(piece)))


def load_yaml(source: SourceFile) -> Any:
    """Parse ``source.text`` into Python values, filling ``source.values`` and
    ``source.keys``. Raises :class:`YamlError` with the offset of the problem."""
    if _may_exceed_limits(source.text):
        _check_limits(source.text)
    loader = _Loader(source.text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "invalid YAML"
        if "maximum nesting depth" in problem:  # PyYAML >= 6.0.4 stops at 1,000 levels
            at = _deep_flow_offset(source.text)
            if at is not None:
                # The events up to there show which collection is the one past MAX_DEPTH
                # (block collections count too), as for shallower files.
                _check_limits(source.text[: at + 1])
                raise YamlError(f"collections nest more than {MAX_DEPTH} deep", at,
                                "yaml-nesting", at + 1, _NESTING_HELP) from None
        if exc.context:
            problem = f"{problem} {exc.context}"
            if exc.context_mark and mark and exc.context_mark.line != mark.line:
                problem += f" that starts on line {exc.context_mark.line + 1}"
        hint = None
        if (exc.problem or "").startswith("mapping values are not allowed"):
            hint = ("a value with ': ' in it must be quoted (prompt: \"Answer this: now\") "
                    "or written as a block (prompt: |, then the text indented below)")
        elif "found character '\\t'" in (exc.problem or ""):
            hint = "YAML indents with spaces, not tabs"
        raise YamlError(f"YAML syntax error: {problem}", mark.index if mark else 0,
                        help=hint) from None
    except yaml.YAMLError as exc:  # reader errors (bad characters) carry a position too
        raise YamlError(f"YAML error: {exc}", getattr(exc, "position", 0) or 0) from None
    finally:
        loader.dispose()
    if node is None:
        return None
    builder = _Builder(loader, source)
    return builder.build(node, ())


def _deep_flow_offset(text: str) -> int | None:
    """The offset of the first flow bracket nested past MAX_DEPTH, skipping quoted strings
    and comments. PyYAML 6.0.4's scanner refuses 1,000 levels of `[`/`{` before its parser
    hands out the events that would show the 65th, so where that is is found here."""
    depth, i, n = 0, 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif ch == "'":
            i += 1
            while i < n and (text[i] != "'" or text.startswith("''", i)):
                i += 2 if text[i] == "'" else 1
        elif ch == "#" and (i == 0 or text[i - 1] in " \t\n"):
            i = text.find("\n", i)
            if i < 0:
                return None
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return i
        elif ch in "]}":
            depth = max(0, depth - 1)
        i += 1
    return None


def _may_exceed_limits(text: str) -> bool:
    """Whether :func:`_check_limits` must look before the file is composed: aliases need
    `&` and `*`; a nesting deep enough to overflow the YAML library's composer (tens of
    thousands of levels) needs that many flow brackets, or a line indented (spaces, `- `,
    `? `) half that deep. Shallower nesting past MAX_DEPTH is reported by the builder."""
    return ("&" in text and "*" in text) or \
        text.count("[") + text.count("{") >= _COMPOSER_SAFE_DEPTH or \
        _LEADING.search(text) is not None


def _check_limits(text: str) -> None:
    """Walk the file's YAML events, sizing what every anchor's aliases will repeat, before
    anything is built. Raises :class:`YamlError` (yaml-alias, yaml-nesting) at the alias or
    collection that goes past a limit, or at a recursive alias; leaves syntax errors to the
    loader (it reports them the same way)."""
    parser = _Loader(text)
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (values, text) it stands for
    open_anchors: set[str] = set()  # anchors of collections not yet closed
    stack: list[list[Any]] = [[0, 0, None]]  # per open collection: values, text, anchor
    added_values = added_text = 0
    try:
        while True:
            try:
                event = parser.get_event()
            except yaml.YAMLError:
                return  # the loader reports it, with its position
            if event is None or isinstance(event, yaml.StreamEndEvent):
                return
            if isinstance(event, yaml.DocumentStartEvent):
                sizes.clear()
            elif isinstance(event, yaml.ScalarEvent):
                top = stack[-1]
                top[0] += 1
                top[1] += len(event.value)
                if event.anchor is not None:
                    sizes[event.anchor] = (1, len(event.value))
            elif isinstance(event, yaml.CollectionStartEvent):
                if len(stack) > MAX_DEPTH:
                    raise YamlError(
                        f"collections nest more than {MAX_DEPTH} deep", event.start_mark.index,
                        "yaml-nesting", event.start_mark.index + 1, _NESTING_HELP)
                stack.append([0, 0, event.anchor])
                if event.anchor is not None:
                    open_anchors.add(event.anchor)
            elif isinstance(event, yaml.CollectionEndEvent):
                values, chars, anchor = stack.pop()
                stack[-1][0] += values + 1
                stack[-1][1] += chars
                if anchor is not None:
                    sizes[anchor] = (values + 1, chars)
                    open_anchors.discard(anchor)
            elif isinstance(event, yaml.AliasEvent):
                name, at = event.anchor, event.start_mark.index
                end = event.end_mark.index if event.end_mark else at + 1
                if name in open_anchors:
                    raise YamlError(
                        f"recursive alias: *{name} is inside the value &{name} names", at,
                        "yaml-alias", end, "an alias can only repeat a value that is complete")
                if name not in sizes:
                    continue  # undefined: the loader reports it
                values, chars = sizes[name]
                added_values += values
                added_text += chars
                stack[-1][0] += values
                stack[-1][1] += chars
                if added_values > MAX_ALIAS_VALUES or added_text > MAX_ALIAS_TEXT:
                    what = (f"{MAX_ALIAS_VALUES} values" if added_values > MAX_ALIAS_VALUES
                            else f"{MAX_ALIAS_TEXT} characters")
                    raise YamlError(
                        f"aliases expand past the limit of {what}: *{name} repeats "
                        f"{values} values ({added_values} repeated by aliases so far)", at,
                        "yaml-alias", end,
                        "write the repeated values out, or repeat them fewer times")
    finally:
        parser.dispose()


_NESTING_HELP = "a pipeline needs a few levels; flatten the structure"


class _Builder:
    def __init__(self, loader: Any, source: SourceFile) -> None:
        self.loader = loader
        self.source = source

    def build(self, node: yaml.Node, path: Path) -> Any:
        values, keys = self.source.values, self.source.keys
        cls = type(node)
        if cls is yaml.ScalarNode:
            values[path] = Span(node.start_mark.index, node.end_mark.index, node.style)
        else:
            if len(path) >= MAX_DEPTH:  # this collection is the one past MAX_DEPTH
                at = node.start_mark.index
                raise YamlError(f"collections nest more than {MAX_DEPTH} deep", at,
                                "yaml-nesting", at + 1, _NESTING_HELP)
            values[path] = Span(node.start_mark.index, node.end_mark.index)
        if cls is yaml.MappingNode:
            out: dict[Any, Any] = {}
            if any(k.tag == _MERGE_TAG for k, _ in node.value):
                return self._merged(node, path, out)
            for key_node, value_node in node.value:
                key = self._key(key_node)
                if key in out:  # YAML says keys are unique; PyYAML would keep the last silently
                    self.source.duplicate_keys.append((str(key), key_node.start_mark.index))
                    continue
                child = (*path, key)
                keys[child] = Span(key_node.start_mark.index, key_node.end_mark.index)
                out[key] = self.build(value_node, child)
            return out
        if cls is yaml.SequenceNode:
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        if node.tag == _STR_TAG:
            return node.value  # the common case, without the constructor's bookkeeping
        return self._construct(node)

    def _construct(self, node: yaml.Node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            mark = exc.problem_mark or node.start_mark
            raise YamlError(f"YAML error: {exc.problem}", mark.index) from None
        except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError):
            # PyYAML's constructors raise plain Python errors for a tagged value they cannot
            # read (`!!int h`, an empty `!!int`, `!!bool name`): the file's mistake, not a
            # crash.
            tag = node.tag.rsplit(":", 1)[-1]
            raise YamlError(f"YAML error: {node.value!r} is not a valid !!{tag} value",
                            node.start_mark.index) from None

    def _key(self, key_node: yaml.Node) -> Any:
        key = key_node.value if key_node.tag == _STR_TAG else self._construct(key_node)
        if isinstance(key, bool) and key_node.value.lower() not in ("true", "false"):
            key = key_node.value  # YAML 1.1's on/off/yes/no: a word as a key (as in YAML 1.2)
        if not isinstance(key, str | int | float | bool) or key is None:
            key = str(key)
        return key

    def _merged(self, node: yaml.MappingNode, path: Path, out: dict[Any, Any]) -> Any:
        """A mapping with merge keys (`<<: *defaults`, `<<: [*a, *b]`): its own keys
        override merged ones (only a repeat among its own keys is a duplicate), an earlier
        mapping in a merge list overrides a later one, as PyYAML does."""
        pairs, merged = self._pairs(node)
        chosen: dict[Any, tuple[int, yaml.Node, yaml.Node]] = {}
        for i, (key_node, value_node) in enumerate(pairs):
            key = self._key(key_node)
            if i >= merged and key in chosen and chosen[key][0] >= merged:
                self.source.duplicate_keys.append((str(key), key_node.start_mark.index))
                continue
            chosen[key] = (i, key_node, value_node)
        for key, (_, key_node, value_node) in chosen.items():
            child = (*path, key)
            self.source.keys[child] = Span(key_node.start_mark.index, key_node.end_mark.index)
            out[key] = self.build(value_node, child)
        return out

    def _pairs(self, node: yaml.MappingNode) -> tuple[list[tuple[yaml.Node, yaml.Node]], int]:
        """The mapping's pairs with merge keys resolved: merged pairs first (later ones win),
        then its own; and how many were merged. Unlike PyYAML's ``flatten_mapping`` the
        nodes are left as they are (an anchored mapping may be reached again)."""
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        own: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                own.append((key_node, value_node))
                continue
            subs = value_node.value if isinstance(value_node, yaml.SequenceNode) else [
                value_node]
            flat = []
            for sub in subs:
                if not isinstance(sub, yaml.MappingNode):
                    raise YamlError("YAML error: a merge key (<<) takes a mapping or a list of "
                                    "mappings", sub.start_mark.index)
                flat.append(self._pairs(sub)[0])
            for pairs in reversed(flat):  # the first mapping listed wins: it comes last
                merged.extend(pairs)
        return merged + own, len(merged)
