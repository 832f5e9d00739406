"""What is sent to the server: a one-line stage 1 on the ssh command line, then the bundle.

Stage 1 checks the Python version, reads a length line and that many zlib-compressed bytes
from stdin, and runs them. They are shuttle_agent/bootstrap.py (stage 2) followed by a call
to boot() with every module the agent imports: the shuttle_agent, shuttle_ends and
shuttle_protocol packages and msgpack's pure-Python modules, named here one by one.
"""

import functools
import importlib.util
import shlex
import zlib
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import shuttle_agent

# msgpack's pure-Python modules; _cmsgpack is compiled and cannot be uploaded.
MSGPACK_MODULES = ("msgpack", "msgpack.exceptions", "msgpack.ext", "msgpack.fallback")
PACKAGES = ("shuttle_agent", "shuttle_ends", "shuttle_protocol")
MIN_PYTHON = (3, 8)

STAGE1 = (
    "import sys,zlib;"
    f"sys.version_info<{MIN_PYTHON} and sys.exit('shuttle-agent: needs python "
    f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer, the server has '+sys.version.split()[0]);"
    "i=sys.stdin.buffer;"
    "exec(compile(zlib.decompress(i.read(int(i.readline()))),'<shuttle-bootstrap>','exec'))"
)


def _module_files() -> Iterator[Tuple[str, bool, Path]]:
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"cannot find the {package} package to upload")
        folder = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(folder.glob("*.py")):
            if path.stem == "__init__":
                yield package, True, path
            elif path.stem != "bootstrap":
                yield f"{package}.{path.stem}", False, path
    for name in MSGPACK_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"cannot find {name} to upload")
        yield name, name == "msgpack", Path(spec.origin)


def bundle_modules() -> Dict[str, Tuple[bool, str]]:
    """Module name → (is_package, source) of everything the agent may import."""
    return {
        name: (is_package, path.read_text(encoding="utf-8"))
        for name, is_package, path in _module_files()
    }


@functools.lru_cache(maxsize=1)
def build_payload() -> bytes:
    """The bytes written to ssh's stdin before the protocol starts. Built once: every
    stream, and every reconnect, uploads the agent this client started with, even if the
    installed files change meanwhile."""
    bootstrap = Path(shuttle_agent.__file__).with_name("bootstrap.py").read_text("utf-8")
    stage2 = f"{bootstrap}\nboot({bundle_modules()!r})\n".encode()
    compressed = zlib.compress(stage2, 9)
    return b"%d\n" % len(compressed) + compressed


def remote_command(python: Optional[str], debug: bool) -> str:
    """The command line the server's shell runs: stage 1, with the chosen python; with
    none chosen, python3, or python where there is no python3 (as sshuttle does). The
    fallback goes through /bin/sh: the login shell may not be a POSIX one."""
    env = "SHUTTLE_AGENT_DEBUG=1 " if debug else ""
    stage1 = shlex.quote(STAGE1)
    if python is not None:
        return f"{env}exec {shlex.quote(python)} -c {stage1}"
    script = (
        f"if command -v python3 >/dev/null 2>&1; then exec python3 -c {stage1}; fi; "
        f"exec python -c {stage1}"
    )
    return f"{env}exec /bin/sh -c {shlex.quote(script)}"


def ssh_argv(
    ssh_cmd: Sequence[str], destination: str, port: Optional[int], command: str
) -> Tuple[str, ...]:
    """ssh's argument list: the user's ssh command, the port, the destination, stage 1."""
    port_args = ("-p", str(port)) if port else ()
    return (*ssh_cmd, *port_args, "--", destination, command)
