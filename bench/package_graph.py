"""The package's shape, measured: import edges between tunesmith's packages (and top-level
modules), cycles among them, imports inside functions, method-type dispatch outside method
folders, and the largest modules and functions.

    python bench/package_graph.py            # a report
    python bench/package_graph.py --json     # the same as JSON

A "unit" is a sub-package (`tunesmith/plan/`) or a top-level module (`tunesmith/models.py`).
An edge A -> B is any import in A of a module in B (at module level or inside a function;
`if TYPE_CHECKING:` imports are not edges)."""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tunesmith"


def method_terms() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The registered methods' names, and the class names dispatch on a method would test:
    their config classes and the adapter holders their implementations define (read from the
    registry, so a new built-in method is covered without listing it here)."""
    from tunesmith.adapters.holders import AdapterHolder
    from tunesmith.registry import registered_methods

    methods = registered_methods()
    for method in methods:
        _ = method.impl  # imports the implementation, which defines the holders
    holders, todo = [], [AdapterHolder]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("tunesmith.methods."):
                holders.append(sub.__name__)
            todo.append(sub)
    configs = {m.config.__name__ for m in methods}
    return tuple(m.name for m in methods), tuple(sorted(configs | set(holders)))


def unit_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "tunesmith"
    sub = PACKAGE / parts[1]
    return parts[1] if sub.is_dir() else parts[1] + ".py"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(tree: ast.Module, here: str):
    """(imported module, inside a function?, line) for every import outside TYPE_CHECKING."""
    found = []

    def visit(node, in_function):
        if isinstance(node, ast.If) and _type_checking(node):
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function = True
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, in_function, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            if base == "tunesmith":  # `from tunesmith import builder`: the modules named
                found.extend(
                    (f"tunesmith.{a.name}", in_function, node.lineno)
                    for a in node.names
                    if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").is_file()
                )
            else:
                found.append((base, in_function, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(tree, False)
    return found


def functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def dispatch_sites(path: Path, text: str) -> list[str]:
    """Lines outside the method folders that test a method's config/layer type or its name."""
    if "tunesmith/methods/" in str(path) or path.name == "registry.py":
        return []
    out = []
    method_names, classes = method_terms()
    names = "|".join(method_names)
    pattern = re.compile(
        rf"isinstance\([^)]*\b({'|'.join(classes)})\b"
        rf"|\.name\s*(==|!=|in)\s*[\"'(]({names})\b"
        rf"|method\s*(==|!=)\s*[\"']({names})[\"']"
    )
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.search(line):
            out.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            strong(v)
    return out


def measure() -> dict:
    edges: dict[str, set[str]] = {}
    module_edges: dict[str, set[str]] = {}
    local_imports, sizes, funcs, sites, private = [], [], [], [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        here = module_name(path)
        unit = unit_of(here)
        sizes.append((len(text.splitlines()), str(path.relative_to(ROOT))))
        where = path.relative_to(ROOT)
        funcs += [(n, f"{where}:{line} {name}") for name, line, n in functions(tree)]
        sites += dispatch_sites(path, text)
        for target, in_function, line in imports(tree, here):
            if in_function:
                local_imports.append(f"{path.relative_to(ROOT)}:{line}: {target}")
            if not target.startswith("tunesmith"):
                continue
            module_edges.setdefault(here, set()).add(target)
            other = unit_of(target)
            if other != unit and other != "tunesmith":
                edges.setdefault(unit, set()).add(other)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tunesmith"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{path.relative_to(ROOT)}:{node.lineno}: {alias.name}")
    return {
        "package_edges": {k: sorted(v) for k, v in sorted(edges.items())},
        "package_cycles": cycles(edges),
        "module_cycles": cycles(module_edges),
        "function_level_imports": local_imports,
        "private_imports_across_modules": private,
        "method_dispatch_outside_methods": sites,
        "largest_modules": sorted(sizes, reverse=True)[:8],
        "largest_functions": sorted(funcs, reverse=True)[:8],
        "modules_over_500_lines": [p for n, p in sizes if n > 500],
        "functions_over_60_lines": [f for n, f in funcs if n > 60],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    found = measure()
    if args.json:
        print(json.dumps(found, indent=1))
        return
    print("package-level import edges:")
    for unit, targets in found["package_edges"].items():
        print(f"  {unit} -> {', '.join(targets)}")
    print(f"package cycles: {found['package_cycles'] or 'none'}")
    print(f"module cycles: {found['module_cycles'] or 'none'}")
    for key in (
        "function_level_imports",
        "private_imports_across_modules",
        "method_dispatch_outside_methods",
        "modules_over_500_lines",
        "functions_over_60_lines",
    ):
        print(f"{key}: {len(found[key])}")
        for line in found[key]:
            print(f"  {line}")
    print("largest modules:", ", ".join(f"{p} ({n})" for n, p in found["largest_modules"]))
    print("largest functions:", ", ".join(f"{f} ({n})" for n, f in found["largest_functions"]))


if __name__ == "__main__":
    main()
