"""The package's shape: the import graph of olmo_fast (its kernels and benchmarks included) has no cycle, no
module outside `olmo_fast.cli` imports the CLI, and every file a docstring, comment or the README names exists.

The graph is read from the source with `ast`, not by importing: every `import` counts wherever it stands (a
function-level import is a cycle as much as a top-level one: it only defers it), relative imports are resolved,
and `from pkg import name` is an edge to the submodule `pkg.name` when there is one, else to `pkg`. Imports under
`if TYPE_CHECKING:` never run and are left out; imports by `importlib` (the backends' providers) are not seen.
"""
from __future__ import annotations

import ast
import io
import os
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# package name -> its folder in the checkout (setup.py maps kernels/ and benchmarks/ into olmo_fast)
PACKAGES = {"olmo_fast": REPO / "olmo_fast", "olmo_fast.kernels": REPO / "kernels",
            "olmo_fast.benchmarks": REPO / "benchmarks"}
CLI = "olmo_fast.cli"


def discover(packages: dict[str, Path]) -> dict[str, Path]:
    """Module name -> source file, for every .py file under the packages' folders."""
    modules = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


class _Imports(ast.NodeVisitor):
    """The absolute names a module imports (`from a import b` as both `a.b` and `a`), at any depth."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.names: list[tuple[str, ...]] = []  # each: candidates, most specific first

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.extend((alias.name,) for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[:len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        self.names.extend((f"{source}.{alias.name}", source) for alias in node.names)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of `modules` it imports (the longest known prefix of each imported name)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        edges = set()
        for candidates in visitor.names:
            for name in candidates:
                known = next((name[:i] for i in _prefix_ends(name) if name[:i] in modules), None)
                if known is not None:
                    edges.add(known)
                    break
        graph[module] = edges - {module}
    return graph


def _prefix_ends(name: str) -> list[int]:
    """End offsets of `name`'s dotted prefixes, longest first ("a.b.c": "a.b.c", "a.b", "a")."""
    return [len(name)] + [i for i in range(len(name) - 1, 0, -1) if name[i] == "."]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def cli_back_edges(graph: dict[str, set[str]], cli: str = CLI) -> list[str]:
    """'a -> b' for each module outside the package `cli` that imports a module of it."""
    def inside(name: str) -> bool:
        return name == cli or name.startswith(cli + ".")

    return [f"{m} -> {t}" for m, targets in sorted(graph.items()) if not inside(m)
            for t in sorted(targets) if inside(t)]


def test_no_import_cycles():
    found = cycles(import_graph(discover(PACKAGES)))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_library_does_not_import_the_cli():
    graph = import_graph(discover(PACKAGES))
    assert {"olmo_fast.cli", "olmo_fast.environment", "olmo_fast.kernels.attention"} <= set(graph)
    assert not cli_back_edges(graph)


def test_checker_sees_deferred_relative_and_submodule_imports(tmp_path):
    """The checks can fail: a toy package with a cycle closed only by a function-level `from . import x`, one
    through `from pkg import submodule`, a type-only import (no edge), and a library module importing the CLI."""
    pkg = tmp_path / "pkg"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "sub").mkdir()
    files = {
        "__init__.py": "",
        "a.py": "from .sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "def f():\n    from .. import a\n",  # a -> sub.b -> a, the return edge deferred
        "c.py": "import pkg.d\n",
        "d.py": "from pkg import c\n",  # c -> d -> c
        "e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import f\n",
        "f.py": "from . import e\n",  # e -> f only for type checkers: no cycle
        "g.py": "def main():\n    from .cli import run\n",
        "cli/__init__.py": "from .run import main\n",
        "cli/run.py": "from .. import g\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(discover({"pkg": pkg}))
    assert graph["pkg.sub.b"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.c"} and graph["pkg.e"] == set()
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"], ["pkg.c", "pkg.d"], ["pkg.cli.run", "pkg.g"]]
    assert cli_back_edges(graph, "pkg.cli") == ["pkg.g -> pkg.cli.run"]


# ------------------------------------------------------------------------------------------- cited files
# Names that look like files of this repository but are not: other projects' files and placeholders.
NOT_OURS = {
    "scripts/train.py": "allenai/OLMo's training script (olmo-fast train takes its configs)",
    "OUT.md": "a placeholder for the page `benchmarks/report.py --markdown` writes",
}
_FILE = re.compile(r"(?<![\w./<>{}$-])([\w.-]*\w(?:/[\w.-]+)*\.(?:py|md|sh|h|cpp|cu|cuh))(?![\w/<>{}])")


def _prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of a Python file's comments and string literals (docstrings among them)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [(tok.start[0], tok.string) for tok in tokens if tok.type in (tokenize.COMMENT, tokenize.STRING)]


def _file_names(repo: Path) -> set[str]:
    """The names of the files in `repo`, hidden folders (.git, .venv) and __pycache__ left out."""
    names: set[str] = set()
    for _, subfolders, files in os.walk(repo):
        subfolders[:] = [d for d in subfolders if not d.startswith((".", "__"))]
        names.update(files)
    return names


def cited_files_missing(repo: Path, sources: list[Path]) -> list[str]:
    """'file:line: name' for each file name in `sources`' comments, strings (README: all text) that exists
    neither beside the citing file or in a folder above it, nor (a bare name) anywhere in the repository."""
    names = _file_names(repo)
    missing = []
    for source in sources:
        chunks = _prose(source) if source.suffix == ".py" else [(1, source.read_text())]
        for first_line, text in chunks:
            for match in _FILE.finditer(text):
                name = match.group(1)
                here = [source.parent, *source.parent.parents]
                if (name in NOT_OURS or ("/" not in name and name in names)
                        or any((folder / name).exists() for folder in here if repo in (folder, *folder.parents))):
                    continue
                line = first_line + text.count("\n", 0, match.start())
                missing.append(f"{source.relative_to(repo)}:{line}: {name}")
    return missing


def test_cited_files_exist():
    sources = [p for folder in PACKAGES.values() for p in sorted(folder.rglob("*.py"))] + [REPO / "README.md"]
    assert not cited_files_missing(REPO, sources)


def test_cited_file_check_can_fail(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg" / "ops").mkdir(parents=True)
    (repo / "pkg" / "ops" / "real.py").write_text("x = 1  # see ops/real.py and real.py\n")
    (repo / "pkg" / "mod.py").write_text('"""Cites ops/real.py, then\nops/gone.py and NOTES.md."""\n# and csrc/x.cu\n')
    found = cited_files_missing(repo, sorted((repo / "pkg").rglob("*.py")))
    assert found == ["pkg/mod.py:2: ops/gone.py", "pkg/mod.py:2: NOTES.md", "pkg/mod.py:3: csrc/x.cu"]

