"""Where shuttle-client's arguments come from before docopt sees them: @file config files,
the SHUTTLE_CLIENT_ARGS variable and the command line, merged so that the later of two
values of a single-valued option wins; and which file and line a mistake is on.

An @file holds one argument per line (sshuttle's convention); a line that starts with an
option may also give its value after whitespace (`--method nft`, `-x 10.0.0.0/8`) or after
`=`. Blank lines and lines starting with # are skipped. A relative @path inside a file is
relative to that file's directory.
"""

import os
import re
import shlex
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import docopt

from .cli import USAGE, Options, UsageError, parse_args, parse_namespace

ENVIRONMENT = "SHUTTLE_CLIENT_ARGS"
COMMAND_LINE = ""  # the source of an argument typed on the command line
MAX_DEPTH = 8  # @files within @files; deeper is refused (a loop is caught before)
MAX_FILE_BYTES = 1 << 24  # a config with 10,000 subnets is a few hundred KiB

# An option the usage lets repeat: "[-x SUBNET]...".
_REPEATED_RE = re.compile(r"\[(--?[\w-]+)(?:[ =][^\]]*)?\]\.\.\.")
_SPLIT_RE = re.compile(r"\s+")


@dataclass(frozen=True)
class Arg:
    """One argument and where it came from: a file and line, the variable or the command line."""

    text: str
    source: str = COMMAND_LINE
    line: int = 0

    @property
    def where(self) -> str:
        """ "path:line", the variable's name, or "" for the command line."""
        return f"{self.source}:{self.line}" if self.line else self.source

    def prefix(self) -> str:
        """where, ready to go before a message."""
        return f"{self.where}: " if self.where else ""


@dataclass(frozen=True)
class Spec:
    """An option of the usage text: its names, whether it takes a value, whether it repeats."""

    short: Optional[str]
    long: Optional[str]
    takes_value: bool
    repeatable: bool

    @property
    def key(self) -> str:
        return self.long or self.short or ""


@dataclass(frozen=True)
class Item:
    """An option with its value, or a positional argument (spec None), as docopt will get it."""

    spec: Optional[Spec]
    value: Optional[str]
    origin: Arg  # the option's argument, or the positional one
    value_origin: Optional[Arg] = None  # the value's, where it is the next argument

    def tokens(self) -> List[str]:
        if self.spec is None:
            return [self.value or ""]
        if self.value is None:
            return [self.spec.key]
        # Attached, so that a value starting with "-" stays a value.
        if self.spec.long:
            return [f"{self.spec.long}={self.value}"]
        return [f"{self.spec.short}{self.value}"]


def option_specs(usage: str) -> Dict[str, Spec]:
    """Every name (-x, --exclude) of every option in usage's Options section, as docopt
    parses that section."""
    usage_part, _, options_part = usage.partition("\nOptions:")
    repeated = set(_REPEATED_RE.findall(usage_part))
    specs: Dict[str, Spec] = {}
    for option in docopt.parse_options(options_part):
        names = [name for name in (option.short, option.longer) if name]
        spec = Spec(option.short, option.longer, bool(option.argcount), bool(repeated & set(names)))
        specs.update((name, spec) for name in names)
    return specs


SPECS = option_specs(USAGE)


def parse_command_line(argv: Sequence[str], environ: Mapping[str, str]) -> Options:
    """Options from SHUTTLE_CLIENT_ARGS, then argv, with @files expanded; UsageError (naming
    the file and line where the argument came from one) for any mistake."""
    items = merge(to_items(collect(argv, environ)))
    try:
        return parse_args(docopt_argv(items))
    except UsageError as exc:
        culprit = blame(str(exc), items)
        if culprit is None or not culprit.where:
            raise
        raise UsageError(f"{culprit.prefix()}{exc}") from None


def named_namespace(argv: Sequence[str], environ: Mapping[str, str]) -> Optional[str]:
    """--namespace's name, read before the rest of the command line (whose host names must
    resolve in there); UsageError for a bad name, or for any mistake that parse_command_line
    will report anyway."""
    values = [
        item.value
        for item in merge(to_items(collect(argv, environ)))
        if item.spec is not None and item.spec.long == "--namespace"
    ]
    return parse_namespace(values[-1]) if values else None


def collect(argv: Sequence[str], environ: Mapping[str, str]) -> List[Arg]:
    """The variable's arguments, then argv's, each @file replaced by its arguments."""
    try:
        words = shlex.split(environ.get(ENVIRONMENT, ""))
    except ValueError as exc:
        raise UsageError(f"{ENVIRONMENT}: {exc}") from None
    args = [Arg(word, ENVIRONMENT) for word in words] + [Arg(word) for word in argv]
    return expand(args, ())


def expand(args: Sequence[Arg], chain: Tuple[str, ...]) -> List[Arg]:
    """args with every @path replaced by that file's arguments; chain: the files being read."""
    result: List[Arg] = []
    for arg in args:
        if arg.text.startswith("@") and len(arg.text) > 1:
            result += read_argfile(arg, chain)
        else:
            result.append(arg)
    return result


def read_argfile(at: Arg, chain: Tuple[str, ...] = ()) -> List[Arg]:
    """The arguments of the file that at ("@path") names, nested @files expanded."""
    path = os.path.expanduser(at.text[1:])
    if at.line and not os.path.isabs(path):
        path = os.path.join(os.path.dirname(at.source), path)
    real = os.path.realpath(path)
    if real in chain:
        raise UsageError(f"{at.prefix()}{at.text} includes itself")
    if len(chain) >= MAX_DEPTH:
        raise UsageError(f"{at.prefix()}{at.text}: @files nested deeper than {MAX_DEPTH}")
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
        text = data.decode("utf-8")
    except OSError as exc:
        raise UsageError(f"{at.prefix()}cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{at.prefix()}cannot read {path}: not UTF-8 text ({exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise UsageError(f"{at.prefix()}cannot read {path}: larger than {MAX_FILE_BYTES} bytes")
    args: List[Arg] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            args += (Arg(word, path, number) for word in split_line(stripped))
    return expand(args, (*chain, real))


def split_line(line: str) -> List[str]:
    """A file's line as arguments: the whole line, except that an option followed by
    whitespace and a value ("-x 10.0.0.0/8", "--method nft") is two."""
    if not line.startswith("-"):
        return [line]
    words = _SPLIT_RE.split(line, maxsplit=1)
    if len(words) == 1 or "=" in words[0]:
        return [line]
    return words


def to_items(args: Sequence[Arg], specs: Mapping[str, Spec] = SPECS) -> List[Item]:
    """args as options with their values and positional arguments; UsageError for an
    unknown option or one without its value (which must come from the same file or line)."""
    items: List[Item] = []
    rest = iter(args)
    for arg in rest:
        text = arg.text
        if text == "-" or not text.startswith("-"):
            items.append(Item(None, text, arg))
        elif text == "--":
            # docopt would take it for a SUBNET, and no SUBNET begins with "-" anyway.
            raise UsageError(f"{arg.prefix()}'--' is no argument of shuttle-client")
        elif text.startswith("--"):
            name, equals, value = text.partition("=")
            spec = _long_spec(name, arg, specs)
            if not spec.takes_value and equals:
                raise UsageError(f"{arg.prefix()}{spec.key} takes no value")
            items.append(_option(spec, spec.key, value if equals else None, arg, rest))
        else:
            items += _shorts(arg, rest, specs)
    return items


def _long_spec(name: str, arg: Arg, specs: Mapping[str, Spec]) -> Spec:
    # docopt accepts any unambiguous prefix of a long option, so this does too.
    if name in specs:
        return specs[name]
    found = sorted({s.key for n, s in specs.items() if n.startswith("--") and n.startswith(name)})
    if len(found) == 1:
        return specs[found[0]]
    if found:
        raise UsageError(f"{arg.prefix()}ambiguous option {name}: {', '.join(found)}")
    raise UsageError(f"{arg.prefix()}unknown option {name}")


def _shorts(arg: Arg, rest: Iterator[Arg], specs: Mapping[str, Spec]) -> List[Item]:
    """-abc: flags a and b and c, or a flag a and option b with the value "c"."""
    items: List[Item] = []
    for index in range(1, len(arg.text)):
        name = f"-{arg.text[index]}"
        spec = specs.get(name)
        if spec is None:
            raise UsageError(f"{arg.prefix()}unknown option {name}")
        if spec.takes_value:
            return [*items, _option(spec, name, arg.text[index + 1 :] or None, arg, rest)]
        items.append(Item(spec, None, arg))
    return items


def _option(spec: Spec, name: str, attached: Optional[str], arg: Arg, rest: Iterator[Arg]) -> Item:
    """The option with its value: attached, or the next argument from the same place."""
    if not spec.takes_value or attached is not None:
        return Item(spec, attached, arg)
    following = next(rest, None)
    if following is None or following.source != arg.source:
        raise UsageError(f"{arg.prefix()}{name} needs a value")
    return Item(spec, following.text, arg, following)


def merge(items: Sequence[Item]) -> List[Item]:
    """items less every single-valued option that a later one of the same name overrides."""
    last = {item.spec.key: index for index, item in enumerate(items) if item.spec}
    return [
        item
        for index, item in enumerate(items)
        if item.spec is None or item.spec.repeatable or last[item.spec.key] == index
    ]


def docopt_argv(items: Sequence[Item]) -> List[str]:
    """The argv for parse_args."""
    return [token for item in items for token in item.tokens()]


def blame(message: str, items: Sequence[Item]) -> Optional[Arg]:
    """The argument a parse_args message is about: the one whose value (quoted, as the
    messages quote values) it names first; failing that, whose option it names first."""
    values = [
        (message.find(repr(item.value)), item.value_origin or item.origin)
        for item in items
        if item.value is not None and repr(item.value) in message
    ]
    names = [
        (match.start(), item.origin)
        for item in items
        if item.spec is not None
        for name in (item.spec.short, item.spec.long)
        if name
        for match in re.finditer(rf"(?<![\w-]){re.escape(name)}(?![\w-])", message)
    ]
    found = values or names
    return min(found, key=lambda pair: pair[0])[1] if found else None
