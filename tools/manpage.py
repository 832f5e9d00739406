"""The man pages shuttle-client(1) and shuttle-firewalld(8), written from each program's
docopt usage text, the one its --help prints, so that a new option is in both at once.

    python -m tools.manpage shuttle-client > shuttle-client.1

The usage text's parts become the page's sections: its first line (`name: summary.`) the
NAME, its `Usage:` block the SYNOPSIS, its `Arguments:` and `Options:` blocks tagged
paragraphs, and every other paragraph the DESCRIPTION.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

# program → (section, module holding USAGE, distribution that has the version)
PAGES = {
    "shuttle-client": ("1", "shuttle_client.cli", "shuttle-client"),
    "shuttle-firewalld": ("8", "shuttle_firewalld.main", "shuttle-firewalld"),
}
# An entry of an Options: or Arguments: block: its names, then two spaces or more, then the
# text; a line indented further continues the text.
ENTRY = re.compile(r"^  (\S.*?)(?:\s{2,}(\S.*))?$")


@dataclass(frozen=True)
class Usage:
    """A usage text cut into the parts a man page shows."""

    name: str
    summary: str
    synopsis: tuple[str, ...]
    description: tuple[str, ...]
    blocks: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # (title, (names, text))


def parse_usage(text: str) -> Usage:
    """The usage text's parts; ValueError if it does not have the shape docopt reads."""
    paragraphs = [part.strip("\n") for part in re.split(r"\n\s*\n", text) if part.strip()]
    if not paragraphs:
        raise ValueError("the usage text is empty")
    first, *lines = paragraphs[0].splitlines()
    name, colon, summary = first.partition(": ")
    if not colon:
        raise ValueError(f"the usage text's first line is not 'name: summary': {first!r}")
    if lines:
        paragraphs[0:1] = [first, "\n".join(lines)]
    synopsis: tuple[str, ...] = ()
    description = []
    blocks = []
    for paragraph in paragraphs[1:]:
        title, *body = paragraph.splitlines()
        if title == "Usage:":
            synopsis = tuple(line.removeprefix("  ") for line in body)
        elif title in ("Arguments:", "Options:"):
            blocks.append((title.rstrip(":").upper(), _entries(body)))
        else:
            description.append(" ".join(paragraph.split()))
    if not synopsis:
        raise ValueError("the usage text has no 'Usage:' block")
    return Usage(name, summary, synopsis, tuple(description), tuple(blocks))


def _entries(lines: Sequence[str]) -> tuple[tuple[str, str], ...]:
    entries: list[tuple[str, str]] = []
    for line in lines:
        match = ENTRY.match(line)
        if match and not line.startswith("   "):
            entries.append((match[1], match[2] or ""))
        elif entries:
            names, text = entries[-1]
            entries[-1] = (names, f"{text} {line.strip()}".strip())
        else:
            raise ValueError(f"an option block starts with a continuation line: {line!r}")
    return tuple(entries)


def roff(text: str) -> str:
    """Text as roff prints it: backslashes and hyphens escaped, no line read as a request."""
    escaped = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + escaped if escaped.startswith((".", "'")) else escaped


def render(usage: Usage, section: str, version: str) -> str:
    """The man page, in the man macros (man -l shows it)."""
    out = [
        f'.TH {usage.name.upper()} {section} "" "{usage.name} {version}" "shuttle"',
        ".nh",  # no hyphens in paths and option names
        ".ad l",
        ".SH NAME",
        f"{roff(usage.name)} \\- {roff(usage.summary.rstrip('.'))}",
        ".SH SYNOPSIS",
        ".nf",
        *(roff(line) for line in usage.synopsis),
        ".fi",
    ]
    if usage.description:
        out.append(".SH DESCRIPTION")
        for paragraph in usage.description:
            out += [".PP", roff(paragraph)]
    for title, entries in usage.blocks:
        out.append(f".SH {title}")
        for names, text in entries:
            out += [".TP", f"\\fB{roff(names)}\\fR", roff(text)]
    return "\n".join(out) + "\n"


def manpage(program: str) -> str:
    """The man page of one of shuttle's programs, from the USAGE of the installed package."""
    if program not in PAGES:
        raise ValueError(f"no man page for {program!r} (known: {', '.join(PAGES)})")
    section, module, distribution = PAGES[program]
    usage = parse_usage(importlib.import_module(module).USAGE)
    return render(usage, section, importlib.metadata.version(distribution))


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python -m tools.manpage {{{','.join(PAGES)}}}", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(manpage(argv[0]))
    except ValueError as exc:
        print(f"tools.manpage: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
