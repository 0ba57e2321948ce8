"""
Framing: the lines of a connection to JSON request objects, and nothing else.

``Framer`` gathers lines until they hold one complete JSON value (a request may span lines) and
refuses what can no longer become one; ``parse`` turns its text into a request object, refusing
what JSON allows but a request may not hold (duplicate keys, NaN, overflowing numbers, lone
surrogates). Errors are the protocol's own (BadRequest, TooLarge). Plain Python.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from measuring.errors import BadRequest, TooLarge

MAX_DEPTH = 32
PREFIX_CHECKS = 200
PREFIX_CHECK_BYTES = 64 * 1024
# What moves the framer: an escape (two characters, skipped whole), a quote, a bracket.
_TOKENS = re.compile(r'\\.|["{}\[\]]')


def json_type(value: object) -> str:
    """The JSON name of a value's type, for messages: ``an array``, ``a string``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        int: "a number",
        float: "a number",
    }
    return names.get(type(value), type(value).__name__)


def _no_constants(name: str) -> Any:
    raise BadRequest(f"the request contains {name}, which is not valid JSON; send null instead")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"the request contains the number {text[:40]}, too large for a float")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise BadRequest(f"the request has the key {duplicate!r} more than once")
    return obj


def too_large(limit: int) -> TooLarge:
    return TooLarge(f"the request is longer than the limit of {limit} bytes")


def _invalid(error: json.JSONDecodeError) -> BadRequest:
    return BadRequest(
        f"the request is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
    )


def parse(text: str) -> dict[str, Any]:
    """One request object from its text; raises BadRequest naming what is wrong."""
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_float=_finite,
        )
    except json.JSONDecodeError as e:
        raise _invalid(e) from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise BadRequest(f"the request has a number that cannot be read: {e}") from None
    if not isinstance(value, dict):
        raise BadRequest(
            f"a request must be a JSON object such as "
            f'{{"Header":"Info","Request":"Status"}}, not {json_type(value)}'
        )
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(
            "the request has a \\u escape that is not a whole character (a lone surrogate)"
        ) from None
    return value


class Framer:
    """
    Collects lines until they hold one complete JSON value, tracking bracket depth outside strings.

    ``feed`` returns the text of a complete request, or None while one is still open; it raises
    TooLarge past ``max_bytes`` and BadRequest past ``MAX_DEPTH`` nested brackets.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self.reset()

    def reset(self) -> None:
        """Forget the request under way."""
        self._parts: list[str] = []
        self._size = 0
        self._depth = 0
        self._started = False

    @property
    def pending(self) -> bool:
        """True while part of a request has arrived."""
        return self._started

    def feed(self, line: str) -> str | None:
        self._size += len(line.encode("utf-8")) + 1
        if self._size > self._max_bytes:
            self.reset()
            raise too_large(self._max_bytes)
        self._parts.append(line)
        self._started = self._started or (line != "" and not line.isspace())
        in_string = False
        for token in _TOKENS.findall(line):
            if in_string:
                in_string = token != '"'
            elif token == '"':
                in_string = True
            elif token in "{[":
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    self.reset()
                    raise BadRequest(f"the request nests deeper than {MAX_DEPTH} levels")
            elif token in "}]":
                self._depth -= 1
        if not self._started:
            self._parts = []
            self._size = 0
            return None
        if self._depth > 0 and not in_string:
            self._check_prefix()
            return None
        text = "\n".join(self._parts)
        self.reset()
        return text

    def _check_prefix(self) -> None:
        """
        Raise BadRequest now when an open request can no longer become valid JSON.

        The decoder stops at the first character that cannot continue valid JSON; when that is
        before the end of what has arrived, more lines cannot help. Checked for the first lines
        only, so that a request of many lines costs no more than reading it.
        """
        if len(self._parts) > PREFIX_CHECKS or self._size > PREFIX_CHECK_BYTES:
            return
        text = "\n".join(self._parts)
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            if e.pos < len(text.rstrip()):
                self.reset()
                raise _invalid(e) from None
