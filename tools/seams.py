"""Measure the seams between netmend's parts (issue: the method-defect contract).

    python tools/seams.py            # summary
    python tools/seams.py --graph    # also every import edge between netmend's modules

Counts, by reading the source (nothing is imported):
- import edges between modules of src/netmend (module level and inside functions), cycles, and those that import a private name (`from x import _y`);
- `getattr` / `hasattr` probes on a defect (first argument `defect`, or `self` / `d` inside netmend/defects/);
- typed configs (dataclasses named *Config or *Options) and their fields;
- hook registrations outside netmend/hooks.py.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "netmend"
HOOK_CALLS = {"register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
              "register_full_backward_pre_hook", "register_hook"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".")
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def scan() -> dict:
    files = sorted(SRC.rglob("*.py"))
    mods = {module_name(f): f for f in files}
    edges: set[tuple[str, str]] = set()
    eager: set[tuple[str, str]] = set()          # imports at module level (run on import), not inside a function
    private: list[str] = []
    probes: list[str] = []
    configs: dict[str, int] = {}
    hooks: list[str] = []
    for mod, f in mods.items():
        tree = ast.parse(f.read_text())
        rel = f.relative_to(SRC.parent)
        in_defects = "defects" in rel.parts
        lazy = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(fn)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(mod, node, f.name == "__init__.py")
                if not target.startswith("netmend"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    dest = sub if sub in mods else target
                    if dest != mod:
                        edges.add((mod, dest))
                        if id(node) not in lazy:
                            eager.add((mod, dest))
                    if alias.name.startswith("_") and not alias.name.startswith("__") and dest != sub:
                        private.append(f"{rel}:{node.lineno} {target}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("netmend") and alias.name != mod:
                        edges.add((mod, alias.name))
                        if id(node) not in lazy:
                            eager.add((mod, alias.name))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
                first = node.args[0] if node.args else None
                while isinstance(first, ast.Call) and isinstance(first.func, ast.Name) and first.func.id == "getattr":
                    first = first.args[0]
                if isinstance(first, ast.Name) and (first.id == "defect" or (first.id in ("self", "d") and in_defects)):
                    probes.append(f"{rel}:{node.lineno}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in HOOK_CALLS:
                if rel.as_posix() != "netmend/hooks.py":
                    hooks.append(f"{rel}:{node.lineno}")
            elif isinstance(node, ast.ClassDef) and node.name.endswith(("Config", "Options")):
                if any("dataclass" in ast.unparse(d) for d in node.decorator_list):
                    configs[f"{rel}:{node.name}"] = sum(isinstance(s, ast.AnnAssign) for s in node.body)
    return {"modules": len(mods), "edges": sorted(edges), "eager": sorted(eager), "private": private, "probes": probes,
            "configs": configs, "hooks": hooks}


def cycles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (import cycles, lazy imports included)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main() -> None:
    s = scan()
    print(f"modules: {s['modules']}; import edges between them: {len(s['edges'])} "
          f"({len(s['eager'])} at module level, {len(s['edges']) - len(s['eager'])} inside functions)")
    print(f"imports of a private name from another module: {len(s['private'])}")
    for p in s["private"]:
        print(f"  {p}")
    print(f"getattr / hasattr probes on a defect: {len(s['probes'])}")
    for p in s["probes"]:
        print(f"  {p}")
    print(f"typed configs: {len(s['configs'])}, fields: {sum(s['configs'].values())}, "
          f"largest: {max(s['configs'].items(), key=lambda kv: kv[1]) if s['configs'] else '-'}")
    print(f"hook registrations outside hooks.py: {len(s['hooks'])}")
    for group in cycles(s["eager"]):
        print(f"import cycle at module level: {' <-> '.join(group)}")
    groups = cycles(s["edges"])
    print(f"import cycles counting imports inside functions: {len(groups)} group(s) of {[len(g) for g in groups]} modules")
    if "--graph" in sys.argv:
        for a, b in s["edges"]:
            print(f"{a} -> {b}")


if __name__ == "__main__":
    main()
