"""One strict JSON parser for every document that arrives from the network.

Python's ``json.loads`` accepts what other parsers read differently, and fails on some input with errors that are
not ``ValueError``s a caller expects: duplicate keys (the last one wins in Python and Go, the first one in others:
two readers of one manifest see two documents), ``NaN``/``Infinity`` (not JSON), UTF-16/UTF-32 and a BOM (guessed
from the bytes), integers of thousands of digits (``ValueError`` from int conversion), 100,000 nested brackets
(``RecursionError``), lone surrogates (``\\ud800``: a ``str`` that cannot be written to SQLite or a UTF-8 header).

``loads`` accepts only I-JSON (RFC 7493), which is what distribution's JSON notes and the OCI specs require in
practice: UTF-8 without a BOM, unique member names, no lone surrogates, finite numbers, integers within int64,
nesting within ``MAX_JSON_DEPTH`` (checked by a linear scan before parsing, so nothing recurses on hostile input),
and a size cap checked first. Anything else raises ``InvalidJSON`` (an ``InvalidRequest``: 400 at the registry's
edges; each face may re-raise it with its own code).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

from docket.errors import InvalidJSON
from docket.limits import INT64_MAX, INT64_MIN, MAX_JSON_DEPTH

_BOM = b"\xef\xbb\xbf"
# nesting is measured on the brackets left after removing escape pairs (so an escaped quote ends nothing), then
# strings (linear: without escapes a string is a quote, non-quotes, a quote), then everything else
_ESCAPE = re.compile(r"\\.", re.DOTALL)
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEPS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_MAX_INT_CHARS = 20  # "-9223372036854775808"


def _fail(what: str, problem: str, hint: str | None = None) -> InvalidJSON:
    return InvalidJSON(f"{what} {problem}", hint or "send strict JSON: UTF-8 without a BOM, unique keys, no NaN")


def check_depth(text: str, limit: int = MAX_JSON_DEPTH, what: str = "JSON document") -> None:
    """Refuse nesting deeper than ``limit`` without parsing, in C-speed passes (no Python loop per character: 4 MiB
    of brackets take a fraction of a second): drop escape pairs, then strings, then everything but brackets, then
    the deepest running sum. Brackets inside strings do not count. On invalid JSON (a stray quote) the result may be
    off: the parser refuses such a document anyway, and ``loads`` turns a RecursionError into InvalidJSON."""
    if text.count("[") + text.count("{") <= limit:
        return
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", _ESCAPE.sub("", text)))
    steps = memoryview(brackets.encode("ascii").translate(_STEPS)).cast("b")  # +1 opens, -1 closes
    depth = max(itertools.accumulate(steps), default=0)
    if depth > limit:
        raise _fail(what, f"nests deeper than {limit} levels ({depth})", "no manifest or image config nests that deep")


def _pairs(what: str):  # noqa: ANN202 - a json hook
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise _fail(what, f"has the key {key[:100]!r} twice in one object",
                                "readers disagree on which value counts: send each key once")
                seen.add(key)
        return obj
    return hook


def _int(what: str):  # noqa: ANN202 - a json hook
    def parse(text: str) -> int:
        value = int(text) if len(text) <= _MAX_INT_CHARS else None
        if value is None or not INT64_MIN <= value <= INT64_MAX:
            raise _fail(what, f"holds the integer {text[:30]}{'...' if len(text) > 30 else ''}, outside 64 bits",
                        "sizes and counts are 64-bit integers")
        return value
    return parse


def _float(what: str):  # noqa: ANN202 - a json hook
    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise _fail(what, f"holds the number {text[:30]}, too large for a 64-bit float")
        return value
    return parse


def _constant(what: str):  # noqa: ANN202 - a json hook
    def parse(name: str) -> Any:
        raise _fail(what, f"holds {name}, which is not JSON")
    return parse


def _check_strings(value: Any, what: str) -> None:
    """Every key and string encodes as UTF-8 (no lone surrogate from a ``\\ud800`` escape). Iterative."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            items: Any = (item,)
        elif isinstance(item, dict):
            items = item.keys()
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for s in items:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise _fail(what, "holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)",
                            "escape characters outside the BMP as a surrogate pair") from exc


def loads(data: bytes | str, *, what: str = "JSON document", max_bytes: int | None = None,
          max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse ``data`` strictly (see the module docstring) or raise ``InvalidJSON`` naming ``what``."""
    size = len(data)
    if max_bytes is not None and size > max_bytes:
        raise _fail(what, f"is {size} bytes; the limit is {max_bytes}")
    if isinstance(data, str):
        text = data
    else:
        if data.startswith(_BOM):
            raise _fail(what, "starts with a byte order mark", "JSON is UTF-8 without a BOM (RFC 8259)")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail(what, f"is not UTF-8 (byte {exc.start})", "JSON is UTF-8 (RFC 8259), not UTF-16 or "
                        "Latin-1") from exc
        if "\x00" in text:
            raise _fail(what, "holds NUL bytes outside strings (UTF-16 or UTF-32?)", "JSON is UTF-8 (RFC 8259)")
    check_depth(text, max_depth, what)
    try:
        value = json.loads(text, object_pairs_hook=_pairs(what), parse_int=_int(what), parse_float=_float(what),
                           parse_constant=_constant(what))
    except json.JSONDecodeError as exc:
        raise _fail(what, f"is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # check_depth makes this unreachable; kept so no input can become a 500
        raise _fail(what, "nests too deeply") from exc
    if _SURROGATE_ESCAPE.search(text):
        _check_strings(value, what)
    return value
