"""Imports run one way (read from the source, nothing imported): util/ never imports a top-level
script, model file or tool; no two modules of the repository import each other, directly or round
about; and every module that creates models by name imports the model modules that register them."""
import ast
import functools
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# packages importable from the repository root, and SEG's own one (SEG/ is its import root)
PACKAGE_ROOTS = {"util": ROOT, "tools": ROOT, "tests": ROOT, "mmseg_custom": os.path.join(ROOT, "SEG")}
# who fills each registry (util/registry.py): a caller of the accessor must import these
REGISTERED_BY = {"pretrain_models": {"models_mae", "models_convmae"}, "finetune_models": {"models_vit"}}


def repository_modules(root=ROOT) -> dict:
    """Module name -> file, for the top-level scripts and the packages of PACKAGE_ROOTS."""
    modules = {name[:-3]: os.path.join(root, name) for name in os.listdir(root) if name.endswith(".py")}
    for package, base in PACKAGE_ROOTS.items():
        folder = os.path.join(base.replace(ROOT, root, 1), package)
        if not os.path.isdir(folder):
            continue
        for dirpath, _, files in os.walk(folder):
            prefix = os.path.relpath(dirpath, os.path.dirname(folder)).replace(os.sep, ".")
            for name in files:
                if name.endswith(".py"):
                    stem = name[:-3]
                    modules[prefix if stem == "__init__" else f"{prefix}.{stem}"] = os.path.join(dirpath, name)
    return modules


def imported_names(path: str, module: str, is_package: bool):
    """Every module name an import statement of the file names (at any depth, lazy imports too)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # `from util import blur`


@functools.lru_cache(maxsize=None)
def import_graph(root=ROOT) -> dict:
    """Module -> the repository modules it imports."""
    modules = repository_modules(root)
    graph = {}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        graph[module] = {name for name in imported_names(path, module, is_package)
                         if name in modules and name != module}
    return graph


def top_level(module: str) -> bool:
    return "." not in module and module not in PACKAGE_ROOTS


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def closure(graph: dict, module: str) -> set:
    seen, todo = set(), [module]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def upward_imports(graph: dict) -> list:
    return sorted(f"{m} imports {t}" for m, targets in graph.items() if m.startswith("util")
                  for t in targets if top_level(t) or t.startswith(("tools", "tests", "mmseg_custom")))


def test_util_never_imports_a_script_a_model_file_or_a_tool():
    graph = import_graph()
    assert "util.registry" in graph and "main_pretrain" in graph  # the scan sees the repository
    assert upward_imports(graph) == []


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_checks_catch_a_loop_and_an_upward_import():
    # the layout this repository had: util/registry.py imported the model files, which import it
    graph = {"util.registry": {"models_mae"}, "models_mae": {"util.registry", "util.pos_embed"},
             "util.datasets": {"blurred_images"}, "blurred_images": {"util.blur"}, "util.blur": set()}
    assert find_cycle(graph) in (["models_mae", "util.registry", "models_mae"],
                                 ["util.registry", "models_mae", "util.registry"])
    assert upward_imports(graph) == ["util.datasets imports blurred_images", "util.registry imports models_mae"]


def modules_using(accessor: str):
    for module, path in repository_modules().items():
        source = open(path, encoding="utf-8").read()
        if f"{accessor}()" in source and module not in ("util.registry", "models_vit"):
            yield module


@pytest.mark.parametrize("accessor", sorted(REGISTERED_BY))
def test_callers_of_a_registry_import_the_models_that_fill_it(accessor):
    graph = import_graph()
    callers = list(modules_using(accessor))
    assert "main_pretrain" in callers or "main_finetune" in callers
    missing = {m: sorted(REGISTERED_BY[accessor] - closure(graph, m)) for m in callers}
    assert {m: names for m, names in missing.items() if names} == {}


def test_code_and_docs_point_at_nothing_outside_the_repository():
    outside = ("../shared", "/work/shared")
    found = []
    for dirpath, dirnames, files in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in files:
            if name.endswith((".py", ".md", ".sh", ".txt", ".cfg", ".toml")) or name == "Makefile":
                path = os.path.join(dirpath, name)
                text = open(path, encoding="utf-8", errors="replace").read()
                if os.path.abspath(path) != os.path.abspath(__file__):
                    found += [f"{os.path.relpath(path, ROOT)}: {o}" for o in outside if o in text]
    assert found == []
