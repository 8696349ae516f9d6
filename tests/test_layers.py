"""The layers (DESIGN.md "Layers"): imports point down only and close no circle, deferred imports included.

    L3 scripts (train.py, eval.py, ...)   nothing imports them
    L2 kit/* and kit/families/*           may use data/, recipes/ and each other, without a circle
    L1 data/*, recipes/*                  may use kit/errors and kit/paths only
    L0 kit/errors.py, kit/paths.py        import nothing of ours

The graph is read from the source (every `import` statement, at the top or inside a function), so an import that
only runs on one path is checked too; then every module is imported in a fresh interpreter.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
L0 = {"kit.errors", "kit.paths"}


def module_files() -> dict[str, Path]:
    """Dotted name -> file of every module of ours (scripts, kit/, data/, recipes/)."""
    found = {path.stem: path for path in ROOT.glob("*.py")}
    for package in ("kit", "data", "recipes"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = module_files()


def layer(name: str) -> int:
    if name in L0:
        return 0
    if name.split(".")[0] in ("data", "recipes"):
        return 1
    if name.split(".")[0] == "kit":
        return 2
    return 3


def imports(name: str) -> set[str]:
    """The modules of ours that `name` imports anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                base = ".".join(filter(None, [package.rsplit(".", node.level - 1)[0] if node.level > 1 else package,
                                              base]))
            # `from kit import chat` imports the module kit.inputs.chat; `from kit.families import Family` the package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import kit.inputs.chat.x` -> the module part that is ours
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def test_every_import_points_down_or_sideways():
    wrong = []
    for name, targets in GRAPH.items():
        for target in targets:
            if layer(target) == 3:
                wrong.append(f"{name} imports the script {target}")
            elif layer(target) > layer(name):
                wrong.append(f"{name} (L{layer(name)}) imports {target} (L{layer(target)})")
            elif layer(name) == 0:
                wrong.append(f"{name} is layer 0 and imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_closes_a_circle():
    circles, done = [], set()

    def visit(name, path):
        if name in path:
            circles.append(" -> ".join(path[path.index(name):] + [name]))
            return
        if name in done:
            return
        for target in sorted(GRAPH[name]):
            visit(target, path + [name])
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, [])
    assert not circles, "\n".join(circles)


def test_the_graph_sees_the_imports_that_matter():
    # the check can only fail if the graph holds the edges: a few that must be there
    assert "kit.families" in GRAPH["kit.inputs.chat"] and "kit.errors" in GRAPH["data.lint"]
    assert "kit.families._tiny" in GRAPH["kit.families.qwen2_vl"] and "kit.paths" in GRAPH["kit.model"]
    assert "data.hub" in GRAPH["kit.model"]  # a deferred import, inside check_hub_model


def test_every_module_imports_in_a_fresh_interpreter():
    # one interpreter, each module imported in turn: an import that fails at run time (a name that moved, a circle
    # through a package's __init__) fails here, whatever the static graph says
    names = sorted(n for n in MODULES if layer(n) < 3)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)"
    result = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_kit_sub_packages_are_empty_at_import():
    # an eager re-export in a package's __init__ would import transformers before Unsloth can patch it
    packages = [path for path in (ROOT / "kit").glob("*/__init__.py") if path.parent.name != "families"]
    assert len(packages) >= 6  # inputs, train, plan, evaluate, export, board
    filled = [str(path.relative_to(ROOT)) for path in packages if path.read_text().strip()]
    assert not filled, filled
