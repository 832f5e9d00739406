"""Field checks used by the message constructors; each raises LocalProtocolError.

Decoding turns these into RemoteProtocolError, so the same check blames whoever built
the value. Explicit checks, never assert (python -O would remove them).
"""

from typing import Any, Tuple

from .errors import LocalProtocolError

MAX_TEXT = 4096


def _show(value: Any) -> str:
    # repr() of an int with more than 4300 digits raises ValueError (CVE-2020-10735 limit).
    try:
        return f"{value!r:.80}"
    except ValueError:
        return f"a {type(value).__name__} too long to show"


def check_int(value: Any, name: str, low: int, high: int) -> None:
    # bool is an int subclass; a peer's True must not pass as 1.
    if type(value) is not int or not low <= value <= high:
        shown = _show(value)
        raise LocalProtocolError(f"{name} must be an integer in [{low}, {high}], got {shown}")


def check_bool(value: Any, name: str) -> None:
    if type(value) is not bool:
        raise LocalProtocolError(f"{name} must be true or false, got {_show(value)}")


def check_number(value: Any, name: str, low: float, high: float) -> None:
    if type(value) not in (int, float) or not low <= value <= high:
        raise LocalProtocolError(f"{name} must be a number in [{low}, {high}], got {_show(value)}")


def check_text(value: Any, name: str, max_len: int = MAX_TEXT) -> None:
    if type(value) is not str or len(value) > max_len:
        raise LocalProtocolError(f"{name} must be text of at most {max_len} characters")


def check_bytes(value: Any, name: str, max_len: int) -> None:
    if type(value) is not bytes or len(value) > max_len:
        raise LocalProtocolError(f"{name} must be bytes of at most {max_len} bytes")


def check_text_tuple(value: Any, name: str, max_items: int, max_len: int = 64) -> None:
    if type(value) is not tuple or len(value) > max_items:
        raise LocalProtocolError(f"{name} must be a list of at most {max_items} items")
    for item in value:
        check_text(item, name + " item", max_len)


def check_choice(value: Any, name: str, choices: Tuple[str, ...]) -> None:
    if type(value) is not str or value not in choices:
        raise LocalProtocolError(f"{name} must be one of {', '.join(choices)}, got {_show(value)}")
