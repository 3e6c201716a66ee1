"""Imports go one way: no cycle among the project's modules (function-level imports included), paligemma knows
nothing of export, demo, bench or shapes but for one documented import made on use, and export's parts stand in
layers, each importing only the layers below it. The package imports its parts on first use: the command line, and
the batch command's Ray driver, start without torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import paligemma

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("paligemma", "export", "demo", "bench", "shapes")
# paligemma.load(backend="onnx") imports the ONNX runtime inside the function: the only way up.
THE_WAY_UP = ("paligemma", "export.runtime")
# export's parts (a subpackage or a module of export/), lowest first. The runtime sits above the transformers.js
# layout: it loads either layout's folder.
EXPORT_LAYERS = (
    ("graphs", "quantize", "variants", "threads"),
    ("writer",),
    ("validation",),
    ("transformers_js",),
    ("runtime",),
    ("siglip", "memory_check", "__main__"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement reaches: `import a.b`, `from a import b` (a.b, or a when b is a name),
    relative ones resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (where an import reaches into another top-level package, that
    package's __init__ too: Python runs it first)."""
    modules = project_modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in imported(node, name, path.name == "__init__.py"):
                if target not in modules or target == name:
                    continue
                graph[name].add(target)
                top = target.split(".")[0]
                if top != name.split(".")[0]:
                    graph[name].add(top)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert THE_WAY_UP[1] in graph[THE_WAY_UP[0]]  # inside load()
    assert "export.writer.onnx_export" in graph["export.runtime.pipeline"]  # inside export_and_validate()
    assert "paligemma.masks" in graph["paligemma.model"]  # from .masks import ...
    assert "paligemma" in graph["bench.worker"]  # import paligemma, inside a function


def test_no_import_cycle():
    graph = import_graph()
    graph[THE_WAY_UP[0]] -= {THE_WAY_UP[1], "export"}  # export.runtime, and the export package it sits in
    assert cycles(graph) == []


def test_no_cycle_is_a_check_that_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_paligemma_imports_no_other_package_but_the_one_way_up():
    upward = {(name, target) for name, targets in import_graph().items() if name.split(".")[0] == "paligemma"
              for target in targets if target.split(".")[0] != "paligemma"}
    assert upward == {THE_WAY_UP, ("paligemma", "export")}  # export.runtime, and the export package it sits in


def export_part(module: str) -> str | None:
    """The part of export/ a module belongs to (its subpackage, or the module itself), None outside export/ or for
    export/__init__.py (the package's entry points, above every part)."""
    names = module.split(".")
    return names[1] if names[0] == "export" and len(names) > 1 else None


def test_every_part_of_export_has_a_layer():
    layered = {part for layer in EXPORT_LAYERS for part in layer}
    assert {export_part(name) for name in import_graph()} - {None} == layered


def test_the_parts_of_export_import_only_the_layers_below_them():
    layer_of = {part: i for i, layer in enumerate(EXPORT_LAYERS) for part in layer}
    upward = sorted(f"{name} -> {target}" for name, targets in import_graph().items() if export_part(name)
                    for target in targets if export_part(target) not in (None, export_part(name))
                    and layer_of[export_part(target)] >= layer_of[export_part(name)])
    assert upward == []


def test_the_package_the_command_line_and_the_ray_driver_start_without_torch():
    code = ("import sys, paligemma, paligemma.batch_command, paligemma.ray_batch; from paligemma.__main__ import main; "
            "main(['batch', '--input', 'no-such-folder', '--out', 'answers.jsonl', '--ray']); "
            "sys.exit('torch' in sys.modules)")  # the command line built and run to its first check
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True).returncode == 0
    code = "import sys, paligemma; paligemma.Pipeline; sys.exit('torch' not in sys.modules)"  # and on first use, it is
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_every_public_name_of_the_package_is_there():
    for name in paligemma.__all__:
        assert getattr(paligemma, name) is not None, name
        assert name in dir(paligemma)
    assert paligemma.Pipeline.__module__ == "paligemma.generate"
    code = "import paligemma, sys; sys.exit(paligemma.masks.__name__ != 'paligemma.masks')"  # a submodule, on use
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        paligemma.nothing_here
