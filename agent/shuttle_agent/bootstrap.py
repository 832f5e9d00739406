"""Stage 2 of the upload: runs on the server, serves the bundled modules from memory.

The client sends this file's source followed by a call to boot() with the bundle: a dict
of module name -> (is_package, source). It is compiled by stage 1, the one-line
`python -c` command, which has already checked the Python version. The modules become
real imports through a meta-path finder, with file names and get_source(), so tracebacks
show source lines. A server msgpack of version 1.0 or newer (C-accelerated) is preferred
to the bundled pure-Python one.
"""

import importlib.machinery
import sys
import types
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple, cast

if TYPE_CHECKING:
    from importlib.abc import Loader

Bundle = Dict[str, Tuple[bool, str]]


class BundleFinder:
    """Finds and loads the modules of the uploaded bundle: a meta-path finder and its own
    loader, with the methods that importlib, linecache and inspect call. Not importlib.abc's
    base classes: importing them (importlib.resources, pathlib, ...) took a tenth of the
    agent's start."""

    def __init__(self, modules: Bundle) -> None:
        self.modules = modules

    def find_spec(
        self,
        fullname: str,
        path: Optional[Sequence[str]],
        target: Optional[types.ModuleType] = None,
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname not in self.modules:
            return None
        loader = cast("Loader", self)  # the methods a Loader has, without its import
        origin = self._filename(fullname)
        is_package = self.is_package(fullname)
        spec = importlib.machinery.ModuleSpec(
            fullname, loader, origin=origin, is_package=is_package
        )
        spec.has_location = True  # so the module gets __file__, as from a file
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        """None: the usual module object."""
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        exec(self.get_code(module.__name__), module.__dict__)  # noqa: S102 (the bundle is ours)

    def is_package(self, fullname: str) -> bool:
        return self.modules[fullname][0]

    def get_source(self, fullname: str) -> str:
        return self.modules[fullname][1]

    def get_filename(self, fullname: str) -> str:
        return self._filename(fullname)

    def get_code(self, fullname: str) -> types.CodeType:
        return compile(self.get_source(fullname), self._filename(fullname), "exec")

    def _filename(self, fullname: str) -> str:
        tail = "/__init__.py" if self.modules[fullname][0] else ".py"
        return "<shuttle-bundle>/" + fullname.replace(".", "/") + tail


def _server_msgpack_usable() -> bool:
    try:
        import msgpack  # noqa: PLC0415
    except ImportError:
        return False
    if tuple(getattr(msgpack, "version", (0,))) >= (1, 0):
        return True
    for name in [n for n in sys.modules if n == "msgpack" or n.startswith("msgpack.")]:
        del sys.modules[name]
    return False


def boot(modules: Bundle) -> None:
    """Install the bundle as importable modules and run the agent on stdin/stdout."""
    if _server_msgpack_usable():
        modules = {k: v for k, v in modules.items() if k.split(".")[0] != "msgpack"}
    sys.meta_path.insert(0, BundleFinder(modules))
    from shuttle_agent.main import main  # noqa: PLC0415

    main()
