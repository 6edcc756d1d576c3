"""YAML loading that remembers where every value came from.

PyYAML's composer gives each node a start and end mark; we turn the node tree into plain
Python values and keep a map from each value's path (``("steps", 0, "prompt")``) to its
span in the file, so every diagnostic can point at the right line and column.
"""

from __future__ import annotations

import bisect
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
    """The file is not valid YAML."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


@dataclass
class SourceFile:
    """The text of one file plus the spans of every value and mapping key in it."""

    path: str
    text: str
    values: dict[Path, Span] = field(default_factory=dict)
    keys: dict[Path, Span] = field(default_factory=dict)
    duplicate_keys: list[tuple[str, int]] = field(default_factory=list)  # (key, offset)
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
    loader = _Loader(source.text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "invalid YAML"
        if exc.context:
            problem = f"{problem} {exc.context}"
            if exc.context_mark and mark and exc.context_mark.line != mark.line:
                problem += f" that starts on line {exc.context_mark.line + 1}"
        raise YamlError(f"YAML syntax error: {problem}", mark.index if mark else 0) from None
    except yaml.YAMLError as exc:  # reader errors (bad characters) carry a position too
        raise YamlError(f"YAML error: {exc}", getattr(exc, "position", 0) or 0) from None
    finally:
        loader.dispose()
    if node is None:
        return None
    builder = _Builder(loader, source)
    return builder.build(node, ())


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
            values[path] = Span(node.start_mark.index, node.end_mark.index)
        if cls is yaml.MappingNode:
            out: dict[Any, Any] = {}
            if any(k.tag == _MERGE_TAG for k, _ in node.value):
                self.loader.flatten_mapping(node)  # resolves YAML merge keys (<<)
            for key_node, value_node in node.value:
                key = key_node.value if key_node.tag == _STR_TAG else \
                    self.loader.construct_object(key_node, deep=True)
                if not isinstance(key, str | int | float | bool) or key is None:
                    key = str(key)
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
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            mark = exc.problem_mark or node.start_mark
            raise YamlError(f"YAML error: {exc.problem}", mark.index) from None
