"""Safe YAML loading that remembers where every value was written.

PyYAML's composer is recursive (10,000-deep nesting ends in RecursionError), expands aliases
without limit when the result is walked (an alias bomb), silently keeps the last of duplicate
keys and forgets line numbers once values are constructed.  Policy files come from pull
requests, so this module builds plain Python values straight from the parser's event stream:
iteratively, with limits on size, documents, depth and alias expansion, rejecting duplicate
keys and non-standard tags, and recording a (line, column) for every path.

Budgets are per FILE and per LOAD, never per document: a file may hold 10,000 documents, and a
limit that restarts at every `---` multiplies by that.  Every value counts once where it is
written and again, whole, wherever an alias repeats it, because that is the work everything
after the loader (validation, messages, compile) does when it walks the data.

`<<` merges only when written plain, as YAML 1.1's merge type and every other tool read it: a
quoted `"<<"` is an ordinary string key (and so an unknown field), not a merge.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, cast

import yaml
from yaml import events as ev

from reconciler.core.model import Location

FieldPath = tuple[str | int, ...]
"""Where a value sits in a document: mapping keys and sequence indexes from the root."""

_Parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_SAFE_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:timestamp",
}


class _MergeKey:
    """The plain `<<` key: a value no YAML scalar can construct, so `"<<"` never equals it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<<'"


_MERGE = _MergeKey()


@dataclass(frozen=True)
class Limits:
    """Bounds that keep a hostile or mistaken file from exhausting the CI runner or a cell.

    `max_nodes` and `max_aliases` are per file (all its documents together); the `max_load_*`
    bounds are for everything one load reads (a policy folder at one revision).  The defaults
    leave an order of magnitude over the largest benchmarked repository (100,000 rules,
    6.3 MiB of YAML, about a million values).
    """

    max_file_bytes: int = 8 * 1024 * 1024
    max_documents: int = 10_000
    max_depth: int = 64
    max_nodes: int = 2_000_000  # values in one file, each alias counting what it repeats
    max_aliases: int = 100_000  # alias uses (`*name`, including `<<: *name`) in one file
    max_files: int = 20_000  # policy files in one load
    max_tree_entries: int = 200_000  # entries (of any kind) listed below the policy folder
    max_load_bytes: int = 64 * 1024 * 1024  # bytes of policy YAML in one load
    max_load_nodes: int = 20_000_000  # values in one load, counted as `max_nodes` counts


DEFAULT_LIMITS = Limits()


class Budget:
    """What one load has left to spend: bytes read and values built, over all its files.

    Mutable on purpose: the reader and the YAML loader draw on the same budget file after
    file, so a thousand files just under every per-file limit still cannot add up to hours.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS):
        self.limits = limits
        self.bytes_left = limits.max_load_bytes
        self.nodes_left = limits.max_load_nodes

    def spend_bytes(self, file: str, size: int) -> None:
        """Charge a file's size before it is read; over the budget is a finding on that file."""
        if size > self.limits.max_file_bytes:
            raise LoadError(
                file, f"file is {size} bytes, over the limit of {self.limits.max_file_bytes} bytes"
            )
        if size > self.bytes_left:
            raise LoadError(
                file,
                f"the policy files add up to more than {self.limits.max_load_bytes} bytes",
            )
        self.bytes_left -= size


class LoadError(Exception):
    """A file that cannot be read as policy YAML; carries where, so the CLI can point at it."""

    def __init__(self, file: str, message: str, line: int | None = None, col: int | None = None):
        super().__init__(message)
        self.file = file
        self.message = message
        self.line = line
        self.col = col

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}:{self.col or 1}: {self.message}"


@dataclass(frozen=True)
class Document:
    """One YAML document: its data as plain values, and the position of every path in it."""

    file: str
    index: int
    data: Any
    line: int
    positions: dict[FieldPath, tuple[int, int]] = field(repr=False, compare=False)

    def location(self, path: FieldPath = ()) -> Location:
        """Where `path` was written, or its nearest written ancestor (for a missing key)."""
        p = tuple(path)
        while p:
            pos = self.positions.get(p)
            if pos is not None:
                return Location(self.file, pos[0], pos[1])
            p = p[:-1]
        pos = self.positions.get((), (self.line, 1))
        return Location(self.file, pos[0], pos[1])


class _Frame:
    __slots__ = ("anchor", "is_map", "key", "key_mark", "merges", "nodes_at_start", "path", "value")

    def __init__(self, value: Any, path: FieldPath, anchor: str | None, nodes: int):
        self.value = value
        self.path = path
        self.is_map = isinstance(value, dict)
        self.key: Any = _NO_KEY
        self.key_mark: Any = None
        self.anchor = anchor
        self.nodes_at_start = nodes
        self.merges: list[Any] = []


_NO_KEY = object()


def _clip(text: str, limit: int = 40) -> str:
    """A scalar quoted for a message, shortened: the offending value may be megabytes."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def decode(file: str, raw: bytes, limits: Limits = DEFAULT_LIMITS) -> str:
    """Bytes to text, refusing oversized and non-UTF-8 input with a message that says where."""
    if len(raw) > limits.max_file_bytes:
        raise LoadError(
            file, f"file is {len(raw)} bytes, over the limit of {limits.max_file_bytes} bytes"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise LoadError(file, "file is not valid UTF-8", line, col) from None


def load_yaml(
    file: str,
    raw: bytes,
    limits: Limits = DEFAULT_LIMITS,
    budget: Budget | None = None,
    cache: ParseCache | None = None,
) -> list[Document]:
    """The one budgeted way to read YAML bytes that someone else wrote (policy, status, ...).

    Refuses, as a LoadError naming file and line: more than `limits.max_file_bytes` bytes,
    non-UTF-8, more than `max_nodes` values or `max_aliases` alias uses in the whole file (all
    documents together), and anything over what `budget` has left when several files are
    loaded as one.  Without a budget the file is a load of its own.  With a `cache`, a file
    parsed before (same name, bytes and limits) is not parsed again (`ParseCache`).
    """
    budget = Budget(limits) if budget is None else budget
    budget.spend_bytes(file, len(raw))
    if cache is None:
        return load_documents(file, decode(file, raw, limits), limits, budget)
    key = cache.key(file, raw, limits)
    hit = cache.get(key)
    if hit is not None and hit.nodes <= budget.nodes_left:
        # The file parsed within these limits before, and the values it builds still fit
        # what this load has left: the same documents, charged as the parse would charge.
        budget.nodes_left -= hit.nodes
        return list(hit.documents)
    left = budget.nodes_left  # a miss, or over budget: parse it and let it fail as it does
    docs = load_documents(file, decode(file, raw, limits), limits, budget)
    cache.put(key, len(raw), _Parsed(tuple(docs), left - budget.nodes_left))
    return docs


@dataclass(frozen=True, slots=True)
class _Parsed:
    documents: tuple[Document, ...]
    nodes: int  # what the parse charged the load's budget


class ParseCache:
    """Files already parsed in this process, by path, limits and content digest.

    A plan loads several revisions of one repository, and they share most files: each
    distinct file is parsed once and its documents handed to every load that reads the same
    bytes under the same name and limits.  The budgets are charged exactly as a parse would
    charge them (bytes before the lookup, the file's values after), so a cached file counts
    against every load that reads it; a file that failed, or that would go over what a load
    has left, is parsed again and fails as it did.  Documents handed out are shared between
    loads: nothing downstream may change them (validation and compile only read).

    A note (`note`, `keep_note`) is what a later pure pass found in one document it holds
    (the schema check's findings), so that pass runs once per distinct document too.
    Bounded: once `max_bytes` of source are held, new files are parsed but not kept.
    """

    def __init__(self, max_bytes: int = DEFAULT_LIMITS.max_load_bytes):
        self._files: dict[tuple[str, Limits, bytes], _Parsed] = {}
        self._bytes_left = max_bytes
        # By id(): only for documents this cache holds, which stay alive (so ids stay theirs).
        self._held: set[int] = set()
        self._notes: dict[int, Any] = {}

    def note(self, document: Document) -> Any:
        """What `keep_note` kept for this very document, or None."""
        return self._notes.get(id(document))

    def keep_note(self, document: Document, value: Any) -> None:
        """Keep `value` for `document` if the cache holds it (else it is not kept)."""
        if id(document) in self._held:
            self._notes[id(document)] = value

    @staticmethod
    def key(file: str, raw: bytes, limits: Limits) -> tuple[str, Limits, bytes]:
        # A digest, not the bytes: the key must not keep every version's source alive.
        return (file, limits, hashlib.sha256(raw).digest())

    def get(self, key: tuple[str, Limits, bytes]) -> _Parsed | None:
        return self._files.get(key)

    def put(self, key: tuple[str, Limits, bytes], size: int, parsed: _Parsed) -> None:
        if size <= self._bytes_left and key not in self._files:
            self._files[key] = parsed
            self._bytes_left -= size
            self._held.update(id(d) for d in parsed.documents)


def load_documents(
    file: str, text: str, limits: Limits = DEFAULT_LIMITS, budget: Budget | None = None
) -> list[Document]:
    """Parse every document of a YAML stream; empty documents are skipped."""
    if len(text) > limits.max_file_bytes:
        raise LoadError(file, f"file is over the limit of {limits.max_file_bytes} bytes")
    builder = _Builder(file, limits, budget)
    try:
        for event in yaml.parse(text, Loader=_Parser):
            builder.feed(event)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        if mark is None:
            raise LoadError(file, message) from None
        raise LoadError(file, message, mark.line + 1, mark.column + 1) from None
    except yaml.YAMLError as exc:
        raise LoadError(file, f"invalid YAML: {exc}") from None
    finally:
        if budget is not None:  # a file that fails has still spent what it built
            budget.nodes_left -= builder.nodes
    return builder.documents


class _Builder:
    """Turns parser events into values; iterative, so depth costs no Python stack."""

    def __init__(self, file: str, limits: Limits, budget: Budget | None):
        self.file = file
        self.limits = limits
        self.documents: list[Document] = []
        self.resolver = yaml.resolver.Resolver()
        self.constructor = yaml.constructor.SafeConstructor()
        self._scalars: dict[tuple[Any, ...], Any] = {}
        # Counted over the whole file, never reset at `---`: see the module docstring.
        self.nodes = 0
        self.aliases = 0
        self.load_left = budget.nodes_left if budget is not None else limits.max_load_nodes
        self.max_nodes = min(limits.max_nodes, self.load_left)
        self._reset(0)

    def _reset(self, line: int) -> None:
        self.stack: list[_Frame] = []
        self.anchors: dict[str, tuple[Any, int]] = {}
        self.positions: dict[FieldPath, tuple[int, int]] = {}
        self.root: Any = None
        self.has_root = False
        self.doc_line = line

    def fail(self, message: str, mark: Any) -> LoadError:
        if mark is None:
            return LoadError(self.file, message)
        return LoadError(self.file, message, mark.line + 1, mark.column + 1)

    def feed(self, event: ev.Event) -> None:
        kind = type(event)
        if kind is ev.ScalarEvent:  # the commonest event: an identity test, not isinstance
            scalar = cast(ev.ScalarEvent, event)
            self._add(self._scalar(scalar), scalar.start_mark, scalar.anchor, 1)
        elif isinstance(event, ev.DocumentStartEvent):
            if len(self.documents) >= self.limits.max_documents:
                raise self.fail(
                    f"more than {self.limits.max_documents} documents in one file",
                    event.start_mark,
                )
            self._reset(event.start_mark.line + 1 if event.start_mark is not None else 1)
        elif isinstance(event, ev.DocumentEndEvent):
            if self.has_root and self.root is not None:
                self.documents.append(
                    Document(
                        self.file,
                        len(self.documents),
                        self.root,
                        self.doc_line,
                        self.positions,
                    )
                )
        elif isinstance(event, ev.AliasEvent):
            if event.anchor not in self.anchors:
                raise self.fail(f"unknown alias *{event.anchor}", event.start_mark)
            self.aliases += 1
            if self.aliases > self.limits.max_aliases:
                raise self.fail(
                    f"more than {self.limits.max_aliases} alias uses in one file",
                    event.start_mark,
                )
            value, size = self.anchors[event.anchor]
            self._add(value, event.start_mark, None, size)
        elif isinstance(event, ev.MappingStartEvent | ev.SequenceStartEvent):
            self._check_tag(event.tag, event.start_mark, collection=True)
            if len(self.stack) >= self.limits.max_depth:
                raise self.fail(
                    f"nesting deeper than {self.limits.max_depth} levels", event.start_mark
                )
            collection: Any = {} if isinstance(event, ev.MappingStartEvent) else []
            path = self._add(collection, event.start_mark, None, 1)
            self.stack.append(_Frame(collection, path, event.anchor, self.nodes))
        elif isinstance(event, ev.MappingEndEvent | ev.SequenceEndEvent):
            frame = self.stack.pop()
            if frame.merges:
                self._merge(frame, event.start_mark)
            if frame.anchor is not None:
                self.anchors[frame.anchor] = (frame.value, self.nodes - frame.nodes_at_start + 1)

    def _check_tag(self, tag: str | None, mark: Any, collection: bool) -> None:
        if tag is None or tag == "!":
            return
        if tag not in _SAFE_TAGS:
            raise self.fail(f"tag {tag!r} is not allowed in policy files", mark)
        if collection and tag not in ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"):
            raise self.fail(f"tag {tag!r} cannot be used on a collection", mark)

    def _scalar(self, event: ev.ScalarEvent) -> Any:
        # Policy files repeat the same keys and values (protocol, tcp, ports...) thousands of
        # times; resolving and constructing each distinct plain scalar once keeps big repos fast.
        key = (event.value, event.implicit, event.tag, event.style)
        cached = self._scalars.get(key, _NO_KEY)
        if cached is not _NO_KEY:
            return cached
        value = self._construct_scalar(event)
        if isinstance(value, str | int | float | bool) or value is None:
            self._scalars[key] = value
        return value

    def _construct_scalar(self, event: ev.ScalarEvent) -> Any:
        self._check_tag(event.tag, event.start_mark, collection=False)
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.resolver.resolve(  # type: ignore[no-untyped-call]  # PyYAML's stubs
                yaml.ScalarNode, event.value, event.implicit
            )
            if tag == "tag:yaml.org,2002:merge":
                return _MERGE
        # The C parser's marks are its own class; ScalarNode only keeps them.
        node = yaml.ScalarNode(
            tag,
            event.value,
            cast(Any, event.start_mark),
            cast(Any, event.end_mark),
            event.style,
        )
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise self.fail(f"cannot read scalar: {exc}", event.start_mark) from None
        except (ValueError, OverflowError) as exc:
            # PyYAML's constructors raise these for `2001-02-30` (no such date) and for
            # integers over Python's 4300-digit conversion limit: a finding, not a traceback.
            raise self.fail(
                f"cannot read scalar {_clip(event.value)}: {exc}", event.start_mark
            ) from None

    def _add(self, value: Any, mark: Any, anchor: str | None, size: int) -> FieldPath:
        if value is _MERGE and not (
            self.stack and self.stack[-1].is_map and self.stack[-1].key is _NO_KEY
        ):
            # PyYAML refuses this too (no constructor for a merge value); tools differ on it.
            raise self.fail("a plain << is a merge key; quote it to write the text '<<'", mark)
        self.nodes += size
        if self.nodes > self.max_nodes:
            raise self._over_budget(mark)
        if anchor is not None:
            self.anchors[anchor] = (value, 1)
        pos = (mark.line + 1, mark.column + 1)
        if not self.stack:
            self.root, self.has_root = value, True
            self.positions[()] = pos
            return ()
        top = self.stack[-1]
        if not top.is_map:
            path = (*top.path, len(top.value))
            top.value.append(value)
            self.positions[path] = pos
            return path
        if top.key is _NO_KEY:
            if isinstance(value, dict | list):
                raise self.fail("a mapping key must be a plain value", mark)
            if value in top.value or (value is _MERGE and top.merges):
                raise self.fail(f"duplicate key {value!r}", mark)
            top.key, top.key_mark = value, mark
            return top.path
        key, top.key = top.key, _NO_KEY
        if key is _MERGE:
            top.merges.append((value, mark))
            return top.path
        path = (*top.path, key if isinstance(key, str) else str(key))
        top.value[key] = value
        self.positions[path] = pos
        return path

    def _over_budget(self, mark: Any) -> LoadError:
        if self.max_nodes == self.limits.max_nodes:
            return self.fail(
                f"file expands to more than {self.limits.max_nodes} values "
                "(all documents together, aliases counted as what they repeat)",
                mark,
            )
        return self.fail(
            f"the policy files expand to more than {self.limits.max_load_nodes} values "
            "(aliases counted as what they repeat); this file goes over",
            mark,
        )

    def _merge(self, frame: _Frame, mark: Any) -> None:
        """YAML merge keys (`<<: *defaults`): explicit keys win, as the spec says."""
        for value, vmark in frame.merges:
            sources = value if isinstance(value, list) else [value]
            for source in sources:
                if not isinstance(source, dict):
                    raise self.fail("a merge key must refer to a mapping", vmark)
                for k, v in source.items():
                    frame.value.setdefault(k, v)
