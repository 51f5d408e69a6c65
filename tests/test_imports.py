"""The project's modules import each other without a cycle (one owner per concern): every `import` and
`from ... import` among gptoss.model, gptoss.graph, gptoss.runtime and gptoss.tools, at any depth (imports inside
functions count too: a lazy import in a circle still ties two concerns together)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "graph", "runtime", "tools")


def module_graph() -> dict[str, set[str]]:
    files = {}
    for top in PACKAGES:
        for f in (ROOT / top).rglob("*.py"):
            parts = ("gptoss",) + f.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import mod` depends on the module; `from pkg import name` on pkg itself
                subs = {f"{base}.{a.name}" for a in node.names} & files.keys()
                deps |= subs if len(subs) == len(node.names) else subs | {base}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycles():
    graph = module_graph()
    assert len(graph) > 20 and graph["gptoss.runtime.runtime"]  # the scan sees the project
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_detector_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_layers_point_down():
    """model <- graph <- runtime <- tools: a lower layer never imports a higher one."""
    order = {p: i for i, p in enumerate(PACKAGES)}
    graph = module_graph()
    upward = [(m, d) for m, deps in graph.items() for d in deps
              if order[d.split(".")[1]] > order[m.split(".")[1]]]
    assert not upward, upward
