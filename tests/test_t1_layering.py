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
