"""Validation at the edge: names that reach SQL and args that reach JSONB."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from .errors import InvalidArgsError, InvalidIdentifierError

# Postgres identifiers are at most 63 bytes; schema names also build the NOTIFY channel
# (``<schema>_jobs``), so they are held shorter to leave room.
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,39}")
_QUEUE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,62}")
_KIND_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,127}")

DEFAULT_MAX_ARGS_BYTES = 256 * 1024


def _check(kind: str, value: object, pattern: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise InvalidIdentifierError(f"invalid {kind} name {value!r}: {rule}")
    return value


def schema_name(value: object) -> str:
    return _check(
        "schema", value, _SCHEMA_RE, "use 1-40 characters of a-z, 0-9 and _, not starting with a digit"
    )


def queue_name(value: object) -> str:
    return _check("queue", value, _QUEUE_RE, "use 1-63 characters of A-Z, a-z, 0-9 and _ . : -")


def kind_name(value: object) -> str:
    return _check(
        "kind", value, _KIND_RE, "use 1-128 characters of A-Z, a-z, 0-9 and _ . : -, starting with a letter or _"
    )


MAX_PARTITION_KEY_CHARS = 512


def partition_key(value: object) -> str:
    """A partition key is a bound value, never SQL; bounded so the index entry stays small."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PARTITION_KEY_CHARS or "\x00" in value:
        raise InvalidArgsError(
            f"invalid partition key {value!r}: use a string of 1-{MAX_PARTITION_KEY_CHARS} characters without NUL")
    return value


def _walk(value: Any, path: str) -> None:
    # Exact types only: subclasses (enums, numpy scalars, bool-likes) would round-trip as
    # something else, and the job would run with args its caller never wrote.
    t = type(value)
    if t is str:
        if "\x00" in value:
            raise InvalidArgsError(f"args{path} contains a NUL character, which PostgreSQL text cannot hold")
        return
    if value is None or t is bool or t is int:
        return
    if t is float:
        if not math.isfinite(value):
            raise InvalidArgsError(f"args{path} is {value!r}: JSON has no NaN or Infinity")
        return
    if t is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise InvalidArgsError(f"args{path} has a key {key!r} that is not a string")
            if "\x00" in key:
                raise InvalidArgsError(f"args{path} has a key with a NUL character")
            _walk(item, f"{path}[{key!r}]")
        return
    if t is list or t is tuple:
        for i, item in enumerate(value):
            _walk(item, f"{path}[{i}]")
        return
    raise InvalidArgsError(
        f"args{path} is a {t.__name__}, which is not JSON; pass str, int, float, bool, None, list or dict"
    )


def encode_payload(value: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_ARGS_BYTES, what: str = "args") -> tuple[dict[str, Any], str]:
    """Prove ``value`` is plain JSON under ``max_bytes``; return it as a dict and as JSON text."""
    if type(value) is not dict:
        value = dict(value)
    _walk(value, "")
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if len(text) > max_bytes // 4 and len(text.encode()) > max_bytes:  # encode only when it may matter
        raise InvalidArgsError(f"{what} are {len(text.encode())} bytes of JSON, over the cap of {max_bytes}")
    return value, text


def json_payload(value: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_ARGS_BYTES, what: str = "args") -> dict[str, Any]:
    """Return ``value`` as a plain dict after proving it is JSON and under ``max_bytes``."""
    return encode_payload(value, max_bytes=max_bytes, what=what)[0]


def json_value(value: Any, what: str = "result") -> Any:
    """Check a handler's return value (or meta) is plain JSON."""
    try:
        _walk(value, "")
    except InvalidArgsError as exc:
        raise InvalidArgsError(str(exc).replace("args", what, 1)) from None
    return value
