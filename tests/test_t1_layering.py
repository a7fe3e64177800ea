"""The package layering: the CLI sits on top of the library, never under it.

``azfs/cli/`` is flags and output over the library; the library
(``azfs/`` outside ``cli/``, ``azfs/node/`` included) and the daemons must
not import it, so that a daemon or ``azfs up`` never goes through the
CLI's parser or its printing.  Every import statement is read with
:mod:`ast`, including the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = "azfs.cli"


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source`` of ``package``, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def library_files() -> list[Path]:
    files = [p for p in (ROOT / "azfs").rglob("*.py") if "cli" not in p.relative_to(ROOT).parts]
    files += [*(ROOT / "agentd").rglob("*.py"), *(ROOT / "managerd").rglob("*.py")]
    return sorted(files)


def cli_imports(source: str, package: str, name: str) -> list[str]:
    return [f"{name}:{line}: {module}" for line, module in imported_modules(source, package)
            if module == FORBIDDEN or module.startswith(FORBIDDEN + ".")]


def test_nothing_below_the_cli_imports_it() -> None:
    files = library_files()
    assert any(p.parts[-2:] == ("node", "demo.py") for p in files)  # the walk finds the node
    offenders = [hit for path in files
                 for hit in cli_imports(path.read_text(), _package(path),
                                        str(path.relative_to(ROOT)))]
    assert offenders == []


def _package(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).parts[:-1])


def test_the_check_sees_every_form_of_import() -> None:
    """The walk itself: each way of importing the CLI is caught, its neighbours are not."""
    source = ("import azfs.cli.main\n"
              "from azfs import cli\n"
              "from ..cli.rest import emit\n"
              "def f():\n    from azfs.cli import kernel\n"
              "import azfs.client.manager\nfrom azfs import client\nfrom . import layout\n")
    hits = cli_imports(source, "azfs.node", "probe")
    assert [h.split(": ")[1] for h in hits] == [
        "azfs.cli.main", "azfs.cli", "azfs.cli.rest", "azfs.cli.rest.emit", "azfs.cli",
        "azfs.cli.kernel"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(files: list[Path]) -> dict[str, set[str]]:
    """Module → the modules of ``files`` it imports (anywhere in it, functions included)."""
    names = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for _, m in imported_modules(path.read_text(), package)
                       if m in names and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules that import each other."""
    found, seen = [], set()
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    if not set(path) & seen:
                        found.append([*path, start])
                        seen |= set(path)
                elif nxt not in path and nxt > start:
                    stack.append((nxt, [*path, nxt]))
    return found


def test_no_two_modules_import_each_other() -> None:
    """No import circle, e.g. ``volumes.store`` (which opens the stores) and the stores.

    The stores import only ``volumes.base``; ``store.open_store`` imports them.
    """
    graph = import_graph([*(ROOT / "azfs").rglob("*.py"), *(ROOT / "agentd").rglob("*.py"),
                          *(ROOT / "managerd").rglob("*.py")])
    assert "azfs.volumes.etcd_store" in graph["azfs.volumes.store"]  # the walk sees it
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
