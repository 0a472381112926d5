"""The package's layout is its design: stages import one way, and no modules import each other.

runtime <- registry <- core <- data <- datasets <- infer <- evaluate <- train <- serve <- cli, and a
plugin imports only the contract's front, `mvit.registry` itself. errors and plots are leaves any
stage may use: errors imports nothing of mvit, plots only errors and the runtime (to write its
files whole). Every import counts: those inside functions (deferred for start-up time) and those
under `if TYPE_CHECKING:` (an annotation that names an upper stage is a dependency all the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mvit"

STAGES = ["runtime", "registry", "core", "data", "datasets", "infer", "evaluate", "train", "serve", "cli"]
LEAVES = {"errors", "plots"}  # import no stage but the runtime
# the public API's lazy names and `python -m mvit` point everywhere; `mvit.registry.check` is the old
# address of `mvit.datasets.check`, kept for plugins' tests written before the engine moved
EXEMPT = {"mvit", "mvit.__main__", "mvit.registry.check"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, modules: set[str]) -> set[str]:
    """The mvit modules `source` imports at run time (a `from package import module` names the module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "mvit")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mvit" and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the mvit modules it imports, for every module under `root` (a package folder)."""
    files = {module_name(path, root): path for path in root.rglob("*.py")}
    return {name: imported_modules(path.read_text(), set(files)) - {name} for name, path in files.items()}


def part_of(module: str) -> str:
    """The stage, leaf or plugin area a module belongs to: mvit.infer.predict -> infer."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def wrong_way_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, imports in sorted(graph.items()):
        if module in EXEMPT:
            continue
        here = part_of(module)
        for target in sorted(imports - EXEMPT):
            there = part_of(target)
            if here == "plugins":
                allowed = target in ("mvit.registry", "mvit.errors")
            elif here in LEAVES:
                allowed = target in ("mvit.errors", "mvit.runtime.files")
            elif there in LEAVES:
                allowed = True
            elif here in STAGES and there in STAGES:
                allowed = STAGES.index(there) <= STAGES.index(here)
            else:
                allowed = False  # a stage importing a plugin by name, or an unknown area
            if not allowed:
                problems.append(f"{module} imports {target}")
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def test_every_import_points_down_the_stages():
    graph = import_graph(PACKAGE)
    assert {part_of(module) for module in graph} >= set(STAGES) | {"plugins"}  # the walk found the package
    assert wrong_way_imports(graph) == []


def test_no_modules_import_each_other():
    assert import_cycles(import_graph(PACKAGE)) == []


def test_every_stage_is_a_package_with_a_docstring_per_module():
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(PACKAGE)} says nothing about its job"


@pytest.fixture
def toy_package(tmp_path):
    """A package shaped like mvit with one import pointing up the stages and one cycle."""
    root = tmp_path / "mvit"

    def module(name: str, source: str = "") -> None:
        path = root.joinpath(*name.split(".")[1:]).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        for folder in [path.parent, *path.parent.parents]:
            if folder == root.parent:
                break
            (folder / "__init__.py").touch()
        path.write_text(source)

    module("mvit.errors")
    module("mvit.core.vit", "from mvit.errors import ConfigError\n")
    module("mvit.infer.predict", "from mvit.core import vit\nfrom mvit.infer import attention\n")
    module("mvit.infer.attention", "def f():\n    from mvit.infer.predict import g\n")  # deferred: still a cycle
    module("mvit.core.weights", "def load():\n    from mvit.train.trainer import Trainer\n")  # up the stages
    module("mvit.train.trainer", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mvit.cli import app\n")
    module("mvit.cli.app")
    module("mvit.plugins.toy", "from mvit.registry import hookimpl\nfrom mvit.core import vit\nfrom mvit.registry.hookspecs import hookimpl\n")
    module("mvit.registry.hookspecs")
    return root


def test_the_checks_find_a_wrong_way_import_and_a_cycle(toy_package):
    graph = import_graph(toy_package)
    assert graph["mvit.infer.predict"] == {"mvit.core.vit", "mvit.infer.attention"}
    assert graph["mvit.train.trainer"] == {"mvit.cli.app"}  # an annotation's import counts
    assert wrong_way_imports(graph) == ["mvit.core.weights imports mvit.train.trainer", "mvit.plugins.toy imports mvit.core.vit",
                                        "mvit.plugins.toy imports mvit.registry.hookspecs", "mvit.train.trainer imports mvit.cli.app"]
    assert import_cycles(graph) == [["mvit.infer.attention", "mvit.infer.predict"]]


def functions(root: Path):
    """(file, function or method node) for every function defined under `root`."""
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


MOST_PARAMETERS = 8  # beyond, settings travel together (RunOptions, GateRecipe, AdaptOptions), not one by one


def crowded_signatures(root: Path) -> list[str]:
    """Public functions and methods (not the command line's commands, whose options are their
    parameters) that take more than MOST_PARAMETERS named parameters, `self` not counted."""
    found = []
    for path, node in functions(root):
        if path.relative_to(root).parts[0] != "cli" and not node.name.startswith("_"):
            arguments = node.args
            names = [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
            count = len(names) - (names[:1] in (["self"], ["cls"]))
            if count > MOST_PARAMETERS:
                found.append(f"{module_name(path, root)}.{node.name} ({count})")
    return found


def test_no_public_function_takes_more_than_eight_parameters():
    assert crowded_signatures(PACKAGE) == []


def test_the_signature_check_finds_a_crowded_function(tmp_path):
    root = tmp_path / "mvit"
    (root / "infer").mkdir(parents=True)
    (root / "infer" / "predict.py").write_text("def predict(a, b, c, d, e, *, f, g, h, i):\n    pass\n\n"
                                               "def _private(a, b, c, d, e, f, g, h, i):\n    pass\n")
    (root / "cli").mkdir()
    (root / "cli" / "predict.py").write_text("def command(a, b, c, d, e, f, g, h, i):\n    pass\n")
    assert crowded_signatures(root) == ["mvit.infer.predict.predict (9)"]


LONGEST_BODY = 60  # lines of a function's body (its signature and docstring not counted)


def long_functions(root: Path) -> list[str]:
    """Functions whose body is over LONGEST_BODY lines and whose docstring does not begin a
    paragraph with "Long on purpose" and say why."""
    found = []
    for path, node in functions(root):
        docstring = ast.get_docstring(node) or ""
        body = node.body[1:] if docstring else node.body
        lines = node.end_lineno - body[0].lineno + 1 if body else 0
        if lines > LONGEST_BODY and "Long on purpose:" not in docstring:
            found.append(f"{module_name(path, root)}.{node.name} ({lines} lines)")
    return found


def test_no_function_body_is_over_sixty_lines_without_saying_why():
    assert long_functions(PACKAGE) == []


def test_the_length_check_finds_a_long_function(tmp_path):
    root = tmp_path / "mvit"
    root.mkdir()
    body = "".join(f"    x{k} = {k}\n" for k in range(LONGEST_BODY + 1))
    (root / "long.py").write_text(f"def silent():\n{body}\n\ndef explained():\n    \"\"\"Long on purpose: a table.\"\"\"\n{body}")
    assert long_functions(root) == [f"mvit.long.silent ({LONGEST_BODY + 1} lines)"]
