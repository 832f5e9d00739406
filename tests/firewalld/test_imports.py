"""firewalld's modules import one another one way: no cycle, not even one the type checker
alone follows (an import under TYPE_CHECKING)."""

import ast
from pathlib import Path
from typing import Dict, Set, Tuple

import shuttle_firewalld

PACKAGE = Path(shuttle_firewalld.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Set[str]:
    """The package's modules this file imports, wherever the import stands."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t.startswith("shuttle_firewalld"))
    return found


def test_no_module_of_firewalld_imports_its_way_back_to_itself() -> None:
    found = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    graph: Dict[str, Set[str]] = {
        name: {t for t in targets if t in found and t != name} for name, targets in found.items()
    }
    done: Set[str] = set()

    def visit(name: str, path: Tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path[path.index(name) :], name))
        if name in done:
            return
        for target in graph[name]:
            visit(target, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())
