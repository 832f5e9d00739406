"""tools/manpage.py: the man pages are the --help text, each part where man puts it, and
man itself reads them (man -l) without a warning."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from tools.manpage import PAGES, main, manpage, parse_usage, render

from .man import man_text

# Every option docopt would read from a usage text: -x and --long.
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def shown(page: str, tmp_path: Path) -> str:
    """The page's text, as man shows it."""
    path = tmp_path / "page.1"
    path.write_text(page)
    return man_text(path)


@pytest.mark.parametrize("program", sorted(PAGES))
def test_the_page_has_every_option_of_help(program: str, tmp_path: Path) -> None:
    section, module, _ = PAGES[program]
    usage = importlib.import_module(module).USAGE
    text = shown(manpage(program), tmp_path)
    assert text.startswith(f"{program.upper()}({section})")
    words = " ".join(text.split())
    options = set(OPTION.findall(usage))
    assert {"--help", "--version"} <= options
    assert {option for option in options if option not in words} == set()
    # Each option's own text follows it, joined into one paragraph.
    for names, description in (entry for _, block in parse_usage(usage).blocks for entry in block):
        assert f"{names} {description}" in words


def test_a_new_option_is_on_the_page(tmp_path: Path) -> None:
    usage = parse_usage(
        "prog: does things.\n\nUsage:\n  prog [--new-one=N]\n\n"
        "Options:\n  --new-one=N  a new option, added to the usage text\n"
        "               only [default: 3].\n"
    )
    words = " ".join(shown(render(usage, "1", "9.9"), tmp_path).split())
    assert "NAME prog - does things SYNOPSIS prog [--new-one=N]" in words
    assert "OPTIONS --new-one=N a new option, added to the usage text only [default: 3]." in words
    assert "prog 9.9" in words


def test_text_that_looks_like_roff_is_printed_as_text(tmp_path: Path) -> None:
    usage = parse_usage(
        "prog: a \\fBsummary\\fR.\n\nUsage:\n  prog\n\n.SH not a section\n\n'br not a request\n"
    )
    words = " ".join(shown(render(usage, "8", "1"), tmp_path).split())
    assert "prog - a \\fBsummary\\fR" in words
    assert ".SH not a section 'br not a request" in words


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "the usage text is empty"),
        ("prog does things\n\nUsage:\n  prog\n", "first line is not 'name: summary'"),
        ("prog: does things.\n\nOptions:\n  -v  loud\n", "has no 'Usage:' block"),
        ("prog: x.\n\nUsage:\n  prog\n\nOptions:\n     more of nothing\n", "continuation line"),
    ],
)
def test_a_usage_text_of_another_shape_is_a_clear_error(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        parse_usage(text)


def test_the_command_says_which_pages_it_knows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shuttle-agent"]) == 2
    known = "known: shuttle-client, shuttle-firewalld"
    assert capsys.readouterr().err == f"tools.manpage: no man page for 'shuttle-agent' ({known})\n"
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("usage: python -m tools.manpage")
