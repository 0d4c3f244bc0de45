"""Validation at the edge: names that reach SQL and args that reach JSONB."""

from __future__ import annotations

import decimal
import json
from collections import abc
import math
import re
from typing import Any, Mapping, Union

from .errors import InvalidArgsError, InvalidIdentifierError

# A whole number as typed: ASCII digits only. int() also reads Arabic-Indic and full-width
# digits and underscores ('١٢٣' acted on job 123), and str.isdigit() passes '²', which
# int() then refuses.
_DECIMAL_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)


def decimal_integer(text: str) -> int | None:
    """``text`` as an int if it is a decimal integer in ASCII digits, else None."""
    return int(text) if _DECIMAL_INTEGER.fullmatch(text) else None

# A number as typed, in ASCII: float() also reads full-width digits, underscores and
# 'nan'/'inf', which a caller that wants them spells out.
_DECIMAL_NUMBER = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*", re.ASCII)


def decimal_number(text: str) -> float | None:
    """``text`` as a float if it is a decimal number in ASCII digits, else None."""
    return float(text) if _DECIMAL_NUMBER.fullmatch(text) else None

# Postgres identifiers are at most 63 bytes; schema names also build the NOTIFY channel
# (``<schema>_jobs``), so they are held shorter to leave room.
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,39}")
_QUEUE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,62}")
_KIND_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,127}")

DEFAULT_MAX_ARGS_BYTES = 256 * 1024
# The largest jsonb value PostgreSQL stores (2**28 - 1 bytes; larger ones are refused).
JSONB_MAX_BYTES = 2**28 - 1


def _check(kind: str, value: object, pattern: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise InvalidIdentifierError(f"invalid {kind} name {value!r}: {rule}")
    return value


def schema_name(value: object) -> str:
    name = _check(
        "schema", value, _SCHEMA_RE, "use 1-40 characters of a-z, 0-9 and _, not starting with a digit"
    )
    # PostgreSQL refuses to create pg_* schemas (pg_temp is the session's temporary one),
    # and pg_dump leaves information_schema out: a queue installed there is in no backup.
    if name.startswith("pg_") or name == "information_schema":
        raise InvalidIdentifierError(f"invalid schema name {name!r}: a system schema; pick another name")
    return name


def queue_name(value: object) -> str:
    return _check("queue", value, _QUEUE_RE, "use 1-63 characters of A-Z, a-z, 0-9 and _ . : -")


def kind_name(value: object) -> str:
    return _check(
        "kind", value, _KIND_RE, "use 1-128 characters of A-Z, a-z, 0-9 and _ . : -, starting with a letter or _"
    )


MAX_PARTITION_KEY_CHARS = 512


def partition_key(value: object) -> str:
    """A partition key is a bound value, never SQL; bounded so the index entry stays small."""
    if (not isinstance(value, str) or not 0 < len(value) <= MAX_PARTITION_KEY_CHARS or "\x00" in value
            or not _is_utf8(value)):
        raise InvalidArgsError(f"invalid partition key {value!r}: use a string of 1-{MAX_PARTITION_KEY_CHARS}"
                               " characters without NUL or lone surrogates")
    return value


# One encoder for every payload: ``json.dumps`` with non-default options builds a new
# JSONEncoder per call. Output is the same as json.dumps(separators=(",", ":"), ensure_ascii=False).
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

# A JSON string's text is at most 6 bytes per character (``\u001f``; UTF-8 needs at most 4).
_STR_BYTES = 6
# float.__repr__ is at most 24 characters ("-2.2250738585072014e-308"); for floats it
# writes without an exponent (1e-4 <= |x| < 1e16), jsonb writes the same digits.
_FLOAT_BYTES = 24
# Ints up to this many bits are bounded by bits // 3 + 2 characters (log10(2) < 1/3, plus a
# sign); larger ones are measured (repr raises past Python's int-to-str digit limit, as
# json.dumps would).
_INT_BOUND_BITS = 4096


def _jsonb_float_bound(value: float) -> int:
    """At least the bytes of a nonzero float in jsonb's text, which has no exponent:
    ``1e308`` is written as its 309 digits and ``5e-324`` as 326 characters (of Python's
    6). Counted from its power of ten (about 0.1 µs), not by writing it (2 µs through
    Decimal: a payload of small floats such as 1e-5 took three times as long to check);
    the exact size is measured only for a payload this bound puts over its cap."""
    power = math.floor(math.log10(abs(value)))  # may be one off either way near a power of ten
    if power >= 0:
        return power + 3  # an integer of power + 1 digits (+1 for the rounding), a sign
    return 20 - power  # "0.", -power - 1 zeros (+1), at most 17 significant digits, a sign


def _jsonb_excess(value: Any) -> int:
    """Bytes the JSON jsonb stores for plain JSON ``value`` (compact) has over Python's:
    its floats with an exponent, written out in full. A loop, not a recursion: only
    reached for payloads near their cap."""
    excess = 0
    stack = [value]
    while stack:
        item = stack.pop()
        t = type(item)
        if t is float:
            text = float.__repr__(item)
            if "e" in text:
                excess += len(format(decimal.Decimal(text), "f")) - len(text)
        elif t is dict:
            stack.extend(item.values())
        elif t is list or t is tuple:
            stack.extend(item)
    return excess


def _stored_bytes(value: Any, text: str) -> int:
    """Size of ``value`` (whose compact JSON is ``text``) as jsonb writes it back to every
    reader (a worker's claim, a listing), which is what a cap must bound: as Python's JSON,
    args of ``1e308``s passed a 256 KiB cap and were read back as 11 MB."""
    return len(text.encode()) + _jsonb_excess(value)


def _where(path: Any) -> str:
    """``path`` is None (the top) or (parent path, key or index), built only on error."""
    parts = []
    while path is not None:
        path, key = path
        parts.append(f"[{key!r}]")
    return "".join(reversed(parts))


def pg_text(text: str) -> str:
    """``text`` as PostgreSQL text (and jsonb) can hold it: NUL and lone surrogates, which
    it refuses (failing the whole statement), written out as escapes. For text the library
    stores but did not choose (error messages, tracebacks, progress messages)."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not _is_utf8(text):
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _is_utf8(text: str) -> bool:
    """False for text holding a lone surrogate (from a bad decode): no UTF-8 encoding exists.
    ASCII text (the usual case) answers without encoding."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The deepest nesting of lists and dicts a payload may have (the args dict is level 1).
# Python's json recurses once per level, under the recursion limit (1000) less the stack
# it runs on: a cap that was that limit less the caller's stack let args through that
# psycopg could not encode at flush (raw RecursionError) or a worker decode at its claim
# (the claim failed, its whole batch stuck running until the leases expired).
MAX_DEPTH = 256


def _walk(value: Any, path: Any, depth: int = 1) -> int:
    """Raise InvalidArgsError unless ``value`` is plain JSON, lists and dicts nested at
    most ``MAX_DEPTH`` deep; return an upper bound on the size in bytes of its compact
    UTF-8 JSON text as jsonb writes it (:func:`_stored_bytes`)."""
    # Exact types only: subclasses (enums, numpy scalars, bool-likes) would round-trip as
    # something else, and the job would run with args its caller never wrote.
    t = type(value)
    if t is str:
        if "\x00" in value:
            raise InvalidArgsError(f"args{_where(path)} contains a NUL character, which PostgreSQL text cannot hold")
        if not _is_utf8(value):
            raise InvalidArgsError(f"args{_where(path)} contains a lone surrogate, which UTF-8 (and so JSON text) cannot hold")
        return _STR_BYTES * len(value) + 2
    if value is None or t is bool:
        return 5
    if t is int:
        bits = value.bit_length()
        if bits <= _INT_BOUND_BITS:
            return bits // 3 + 2
        try:
            return len(repr(value))
        except ValueError:  # past Python's int-to-str digit limit, which json.dumps shares
            raise InvalidArgsError(f"args{_where(path)} is an int of {bits} bits, too large to write as JSON") from None
    if t is float:
        if not math.isfinite(value):
            raise InvalidArgsError(f"args{_where(path)} is {value!r}: JSON has no NaN or Infinity")
        if 1e-4 <= value < 1e16 or -1e16 < value <= -1e-4 or value == 0:
            return _FLOAT_BYTES
        return _jsonb_float_bound(value)
    if (t is dict or t is list or t is tuple) and depth > MAX_DEPTH:
        raise InvalidArgsError(f"args: nested too deeply to write as JSON (over {MAX_DEPTH} levels of lists and dicts)")
    if t is dict:
        size = 2
        for key, item in value.items():
            if type(key) is not str:
                raise InvalidArgsError(f"args{_where(path)} has a key {key!r} that is not a string")
            if "\x00" in key:
                raise InvalidArgsError(f"args{_where(path)} has a key with a NUL character")
            if not _is_utf8(key):
                raise InvalidArgsError(f"args{_where(path)} has a key with a lone surrogate")
            # "key":item, -- quotes, colon and comma
            size += _STR_BYTES * len(key) + 4 + _walk(item, (path, key), depth + 1)
        return size
    if t is list or t is tuple:
        size = 2
        for i, item in enumerate(value):
            size += _walk(item, (path, i), depth + 1) + 1
        return size
    raise InvalidArgsError(
        f"args{_where(path)} is a {t.__name__}, which is not JSON; pass str, int, float, bool, None, list or dict"
    )


def _walk_all(value: Any, what: str = "args") -> int:
    """:func:`_walk` from the top. A value nested deeper than Python's recursion allows
    (json.dumps could not write it either) is refused as not JSON, like any other: as a
    RecursionError it escaped enqueue raw, and a worker took such a handler result for a
    retryable failure, running the handler again on every attempt. The error names
    ``what`` is checked (a bad ``meta=`` was reported as bad args)."""
    try:
        return _walk(value, None)
    except RecursionError:
        raise InvalidArgsError(f"{what}: nested too deeply to write as JSON") from None
    except InvalidArgsError as exc:
        if what == "args":
            raise
        raise InvalidArgsError(str(exc).replace("args", what, 1)) from None


def _encode_walked(value: Any, what: str) -> str:
    """The JSON text of a value :func:`_walk` accepted. The walk can pass a value a hair
    under Python's recursion limit that the encoder, one frame deeper, cannot write."""
    try:
        return _encode(value)
    except RecursionError:
        raise InvalidArgsError(f"{what}: nested too deeply to write as JSON") from None


def _over_cap(what: str, size: int, max_bytes: int) -> InvalidArgsError:
    return InvalidArgsError(f"{what} are {size} bytes of JSON, over the cap of {max_bytes}"
                            " (numbers counted as jsonb writes them: 1e308 is 309 digits)")


def _as_dict(value: Any, what: str) -> dict[str, Any]:
    """``value`` as a dict, if it is a mapping. ``dict()`` of anything else raised the
    builtins' TypeError or ValueError ("dictionary update sequence element #0 has length 1"
    for one dict passed to enqueue_many as its list of args), or took a list of pairs."""
    if type(value) is dict:
        return value
    if not isinstance(value, abc.Mapping):
        raise InvalidArgsError(f"{what} must be a mapping of JSON values, not {type(value).__name__}")
    return dict(value)


def encode_payload(value: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_ARGS_BYTES, what: str = "args") -> tuple[dict[str, Any], str]:
    """Prove ``value`` is plain JSON under ``max_bytes``; return it as a dict and as JSON text."""
    value = _as_dict(value, what)
    bound = _walk_all(value, what)
    text = _encode_walked(value, what)
    if bound > max_bytes:  # measured only when it may matter
        size = _stored_bytes(value, text)
        if size > max_bytes:
            raise _over_cap(what, size, max_bytes)
    return value, text


def json_payload(value: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_ARGS_BYTES, what: str = "args") -> dict[str, Any]:
    """Return ``value`` as a plain dict after proving it is JSON and under ``max_bytes``.

    The JSON text is only built when the size bound from the walk exceeds the cap (the
    driver encodes the dict again when it sends it): for the usual small args, the check
    costs one walk and no encoding.
    """
    value = _as_dict(value, what)
    if _walk_all(value, what) > max_bytes:
        size = _stored_bytes(value, _encode_walked(value, what))
        if size > max_bytes:
            raise _over_cap(what, size, max_bytes)
    return value


def jsonb_number(text: str) -> Union[int, float]:
    """A JSON number with a fraction or exponent, as a worker reads it back from jsonb
    (``json.loads``' ``parse_float``).

    jsonb stores numbers as numeric, which writes them out with as many decimals as the
    literal had after its exponent is applied: ``1e+16`` comes back as
    ``10000000000000000`` (an int to json), ``-0.0`` as ``0.0``."""
    mantissa, _, exponent = text.lower().partition("e")
    if len(mantissa.partition(".")[2]) - int(exponent or 0) <= 0:
        return int(decimal.Decimal(text))
    return float(text) + 0.0  # numeric has no negative zero


def as_stored(value: Any) -> Any:
    """Plain JSON ``value`` as jsonb stores it and a worker reads it back: numbers as
    :func:`jsonb_number` reads them, tuples as lists. A str, int, bool or None (and a
    dict or list of only those, the usual args) is returned as it is."""
    t = type(value)
    if t in _UNCHANGED or (t is dict and all(type(v) in _UNCHANGED for v in value.values())) or (
            t is list and all(type(v) in _UNCHANGED for v in value)):
        return value
    return json.loads(_encode(value), parse_float=jsonb_number)


_UNCHANGED = (str, int, bool, type(None))


def json_value(value: Any, what: str = "result") -> Any:
    """Check a handler's return value (or meta) is plain JSON."""
    _walk_all(value, what)
    return value


# A handler's returned result is written by the completer, within its deadline (lease/2,
# at least 2 s) and beside other jobs' outcomes: 16 MB of JSON takes about half a second
# to write. A larger one could not land within the deadline (the completer kept retrying
# the batch it was in, for ever) and past 256 MB jsonb refuses it; the job ends dead
# instead, with the reason.
MAX_RESULT_BYTES = 16 * 1024 * 1024


def json_text(value: Any, what: str = "result", *, max_bytes: int = MAX_RESULT_BYTES) -> str:
    """A handler's return value checked as plain JSON (:func:`json_value`) and written,
    at most ``max_bytes`` of UTF-8."""
    bound = _walk_all(value, what)
    text = _encode_walked(value, what)
    if bound > max_bytes:  # measured only when it may matter
        size = _stored_bytes(value, text)
        if size > max_bytes:
            raise InvalidArgsError(
                f"{what} is {size} bytes of JSON, over the cap of {max_bytes}"
                " (numbers counted as jsonb writes them: 1e308 is 309 digits)")
    return text
