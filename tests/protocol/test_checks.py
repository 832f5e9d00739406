"""The field checks behind every message constructor."""

from typing import Any

import pytest
from shuttle_protocol.checks import (
    check_bool,
    check_bytes,
    check_choice,
    check_int,
    check_number,
    check_text,
    check_text_tuple,
)
from shuttle_protocol.errors import LocalProtocolError

from .strategies import show


@pytest.mark.parametrize("value", [0, 1, 10])
def test_check_int_accepts_the_closed_range(value: int) -> None:
    check_int(value, "n", 0, 10)


@pytest.mark.parametrize(
    "value", [-1, 11, True, False, 1.0, "1", None, b"1", 10**5000, 2**64], ids=show
)
def test_check_int_refuses(value: Any) -> None:
    with pytest.raises(LocalProtocolError, match="n must be an integer"):
        check_int(value, "n", 0, 10)


@pytest.mark.parametrize("value", [True, False])
def test_check_bool_accepts_true_and_false(value: bool) -> None:
    check_bool(value, "b")


@pytest.mark.parametrize(
    "value",
    [1, 0, -1, 2, 1.0, 0.0, "true", "", b"\x01", None, (), (True,), [True], 10**5000],
    ids=show,
)
def test_check_bool_refuses_everything_else(value: Any) -> None:
    with pytest.raises(LocalProtocolError, match="b must be true or false, got "):
        check_bool(value, "b")


@pytest.mark.parametrize("value", [0.5, 1, 2.0, 0.5000001])
def test_check_number_accepts_ints_and_floats_in_range(value: float) -> None:
    check_number(value, "x", 0.5, 2.0)


@pytest.mark.parametrize(
    "value", [0.4, 2.1, True, "1", None, float("nan"), float("inf"), 10**5000], ids=show
)
def test_check_number_refuses(value: Any) -> None:
    with pytest.raises(LocalProtocolError, match="x must be a number"):
        check_number(value, "x", 0.5, 2.0)


def test_check_text_counts_characters_not_bytes() -> None:
    check_text("\u20ac" * 4, "t", 4)  # 12 bytes of UTF-8
    check_text("", "t", 0)
    with pytest.raises(LocalProtocolError):
        check_text("\u20ac" * 5, "t", 4)


@pytest.mark.parametrize("value", [b"x", bytearray(b"x"), None, 1, ("x",)], ids=repr)
def test_check_text_refuses_non_str(value: Any) -> None:
    with pytest.raises(LocalProtocolError, match="t must be text"):
        check_text(value, "t", 10)


def test_check_text_refuses_str_subclasses() -> None:
    class Sneaky(str):
        pass

    with pytest.raises(LocalProtocolError):
        check_text(Sneaky("x"), "t", 10)


def test_check_bytes() -> None:
    check_bytes(b"", "b", 0)
    check_bytes(b"abc", "b", 3)
    for bad in [b"abcd", bytearray(b"a"), memoryview(b"a"), "a", None, 1]:
        with pytest.raises(LocalProtocolError, match="b must be bytes"):
            check_bytes(bad, "b", 3)


def test_check_text_tuple() -> None:
    check_text_tuple((), "l", 0)
    check_text_tuple(("a", "b" * 5), "l", 2, 5)
    for bad in [["a"], ("a", "b", "c"), ("b" * 6,), (1,), "ab", None]:
        with pytest.raises(LocalProtocolError):
            check_text_tuple(bad, "l", 2, 5)


def test_check_choice() -> None:
    check_choice("b", "c", ("a", "b"))
    for bad in ["A", "", "ab", b"a", None, 1, 10**5000]:
        with pytest.raises(LocalProtocolError, match="c must be one of a, b"):
            check_choice(bad, "c", ("a", "b"))
