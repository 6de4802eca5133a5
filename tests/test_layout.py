"""The package's shape, read from its source with ``ast``: the module import graph is acyclic, and
the layers point one way: the core imports no host (``worldkv_connector.integration.*``) and no
application (``cli``, ``bench``, ``world``, which drive the video host end to end); hosts import
the core only; ``bench`` imports nothing from ``cli``."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# top-level folder -> the package it ships as (setup.py's PACKAGE_DIRS)
FOLDERS = {
    "worldkv_connector": "worldkv_connector",
    "kernels": "worldkv_connector.kernels",
    "integration": "worldkv_connector.integration",
    "csrc": "worldkv_connector.csrc",
}
HOSTS = "worldkv_connector.integration"
# Import edges allowed to close a cycle, each with why. ModelConfig.num_params counts a non-Wan
# family's parameters by building its model on the meta device (a function-level import).
KNOWN_CYCLE_EDGES = {
    ("worldkv_connector.integration.video.model_config", "worldkv_connector.integration.video.models"),
}
# The applications: they drive a host end to end (the video engine), so they sit above the hosts.
APPS = ("worldkv_connector.__main__", "worldkv_connector.cli", "worldkv_connector.bench", "worldkv_connector.world")
# The GPU check drives every bench and cli command of its plan, and parses them with the cli's parser.
BENCH_USING_CLI = ("worldkv_connector.bench.gpu_check",)


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every shipped module (tests are not shipped)."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if "tests" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports anywhere in its source (function-level included).
    ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module, else ``pkg``."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str) -> None:
        # the longest prefix that is one of our modules
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    add(f"{source}.{alias.name}")
                else:
                    add(source)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _within(name: str, packages: tuple[str, ...] | str) -> bool:
    packages = (packages,) if isinstance(packages, str) else packages
    return any(name == p or name.startswith(p + ".") for p in packages)


def _is_core(name: str) -> bool:
    """The library: everything in the namespace but the hosts and the applications."""
    return not _within(name, HOSTS) and not _within(name, APPS)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_the_package():
    graph = _graph()
    assert "worldkv_connector.connector" in graph
    assert "worldkv_connector.integration.vllm" in graph
    assert "worldkv_connector.kernels" in graph
    # a function-level import is an edge too
    assert any(graph[name] for name in graph if _is_core(name))
    assert "worldkv_connector.integration.video.models" in graph["worldkv_connector.integration.video.model_config"]


def test_module_imports_are_acyclic():
    graph = {name: {t for t in targets if (name, t) not in KNOWN_CYCLE_EDGES} for name, targets in _graph().items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_core_imports_no_host():
    bad = sorted(
        f"{name} imports {target}"
        for name, targets in _graph().items()
        if _is_core(name)
        for target in targets
        if _within(target, HOSTS) or _within(target, APPS)
    )
    assert bad == [], "the core imports a host or an application:\n" + "\n".join(bad)


def test_hosts_import_no_application():
    bad = sorted(f"{name} imports {target}" for name, targets in _graph().items() if _within(name, HOSTS)
                 for target in targets if _within(target, APPS))
    assert bad == [], "a host imports an application:\n" + "\n".join(bad)


def test_bench_imports_nothing_from_cli():
    bad = sorted(f"{name} imports {target}" for name, targets in _graph().items()
                 if _within(name, "worldkv_connector.bench") and name not in BENCH_USING_CLI for target in targets
                 if _within(target, "worldkv_connector.cli"))
    assert bad == [], "bench imports the cli:\n" + "\n".join(bad)


MAX_LINES = 420  # STYLE.md: "aim for files under about 400 lines"


def _shipped_files() -> dict[str, int]:
    """Repository-relative path -> line count, for every shipped module."""
    return {path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines()) for path in _modules().values()}


def test_every_package_exports_its_entry_points_with_all():
    missing = []
    for path in sorted(_modules().values()):
        if path.name != "__init__.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        if not any(isinstance(node, (ast.Assign, ast.AnnAssign))
                   and any(isinstance(t, ast.Name) and t.id == "__all__"
                           for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))
                   for node in tree.body):
            missing.append(path.relative_to(ROOT).as_posix())
    assert missing == [], "package __init__.py without __all__:\n" + "\n".join(missing)


def test_no_shipped_file_is_over_the_limit():
    sizes = _shipped_files()
    too_long = sorted(f"{path}: {n} lines" for path, n in sizes.items() if n > MAX_LINES)
    assert too_long == [], f"files over {MAX_LINES} lines (split them by role):\n" + "\n".join(too_long)
