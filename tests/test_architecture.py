"""The shape of the house, checked: imports point downward and no module keeps hidden state.

Read from the source with `ast`, so imports inside functions count too (an import hidden in a
function to dodge a circle is still a circle).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "rewards", "tasks", "flows")  # lowest first: each may import only those before it and itself


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """First-party modules `name` imports anywhere in its file. `from a.b import c` is an edge
    to a.b.c when that is a module, else to a.b."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


@functools.cache
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_anywhere_imports_inside_functions_included():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_sees_a_circle_made_through_a_function_level_import():
    graph = {"flows.a": {"flows.b"}, "flows.b": {"flows.c"}, "flows.c": {"flows.a"}, "flows.d": set()}
    assert _cycles(graph) == [["flows.a", "flows.b", "flows.c"]]


def test_imports_point_downward_data_rewards_tasks_flows():
    upward = []
    for name, targets in _graph().items():
        rank = PACKAGES.index(name.split(".")[0])
        upward += [f"{name} -> {t}" for t in sorted(targets) if PACKAGES.index(t.split(".")[0]) > rank]
    assert upward == []


# Module-level objects that change after import, each with why it may. Any other module-level
# object that a function of its module changes fails the test below: what lives as long as a
# flow run belongs to an object of that run (flows/runner.py), not to a module.
DOCUMENTED = {
    # registries, filled by their decorator when the modules that register are imported
    "rewards/registry.py:_REGISTRY": "reward registry (@register_reward; duplicates rejected)",
    "rewards/environments/registry.py:_REGISTRY": "environment registry (@register_environment; duplicates rejected)",
    "flows/observe/tracking.py:SINKS": "tracking sinks (@sink)",
    "tasks/engines/__init__.py:ENGINES": "generation engines (@register_engine)",
    "tasks/engines/__init__.py:REQUIREMENTS": "the optional package each engine needs, registered with it",
    "tasks/schedule.py:_SCHEDULES": "learning-rate schedules (@schedule)",
    # the sandbox's zygote is a process of its own: its program keeps what it set up once
    "rewards/sandbox/child.py:_FILTER": "the zygote's seccomp filter, built once before it forks candidates",
    "rewards/sandbox/child.py:_SITE_FOLDERS": "the scorer's package folders, given to the zygote once",
    # process caches: expensive objects kept between stages of one process, keyed by what
    # they were built from, so a later flow run in the same process reuses or replaces them
    "tasks/model.py:_LIVE": "the policy held in memory between stages (one at a time)",
    "tasks/model.py:_SAVER": "the one background checkpoint writer thread of the process",
    "tasks/model.py:_PENDING": "background checkpoint writes not yet waited for",
    "tasks/generate.py:_KEPT_REFERENCES": "a small reference model kept between generate stages",
    "tasks/engines/__init__.py:_ACTIVE": "the generation engine kept for the process (vLLM's start-up)",
    "rewards/pool.py:_SHARED": "scoring worker pools reused by score and evaluate",
    "rewards/sandbox/trusted.py:_ZYGOTES": "sandbox zygote processes, forked per candidate",
}

_MUTABLE_CALLS = {"dict", "list", "set", "deque", "defaultdict", "OrderedDict", "ThreadPoolExecutor"}
_MUTATING_METHODS = {
    "append",
    "extend",
    "insert",
    "pop",
    "popitem",
    "clear",
    "update",
    "setdefault",
    "add",
    "discard",
    "remove",
    "submit",
}


def _changed_module_globals() -> set[str]:
    """`file:NAME` for each module-level container that a statement of the module changes."""
    found = set()
    for path in sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        tree = ast.parse(path.read_text())
        containers = set()
        for node in tree.body:
            target, value = None, None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign):
                target, value = node.target, node.value
            if not isinstance(target, ast.Name) or value is None:
                continue
            call = value.func if isinstance(value, ast.Call) else None
            called = call.attr if isinstance(call, ast.Attribute) else call.id if isinstance(call, ast.Name) else ""
            if isinstance(value, (ast.Dict, ast.List, ast.Set)) or called in _MUTABLE_CALLS:
                containers.add(target.id)
        for node in ast.walk(tree):
            name = None
            if isinstance(node, (ast.Subscript,)) and isinstance(node.ctx, (ast.Store, ast.Del)):
                name = node.value.id if isinstance(node.value, ast.Name) else None
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in _MUTATING_METHODS and isinstance(node.func.value, ast.Name):
                    name = node.func.value.id
            elif isinstance(node, ast.Global):
                found.update(f"{path.relative_to(ROOT).as_posix()}:{n}" for n in node.names)
            if name in containers:
                found.add(f"{path.relative_to(ROOT).as_posix()}:{name}")
    return found


def test_no_module_level_state_outside_the_documented_caches_and_registries():
    undocumented = sorted(_changed_module_globals() - set(DOCUMENTED))
    assert undocumented == [], (
        "module-level objects changed after import: make them state of the flow run's object "
        "(flows/runner.py), or document them in DOCUMENTED with the reason"
    )


def test_every_documented_entry_is_still_module_state():
    assert sorted(set(DOCUMENTED) - _changed_module_globals()) == []


def test_the_configs_variant_names_are_the_keys_of_the_tables_they_select_from():
    """The config spells each variant as a Literal (so `grpo --help` lists them without importing torch); the
    table the variant is picked from is the one source of truth, and the two may never drift."""
    import typing

    from flows.config import GRPOConfig
    from flows.settings import ENGINE_OPTIONS
    from tasks import objective
    from tasks.distributed import PARALLELISMS
    from tasks.engines import ENGINES
    from tasks.schedule import known_schedules

    def names(field: str) -> set[str]:
        arms = [GRPOConfig.model_fields[field].annotation]
        while arms and typing.get_origin(arms[0]) is not typing.Literal:
            arms = [a for arm in arms for a in typing.get_args(arm)]
        return {str(v) for v in typing.get_args(arms[0])}

    assert names("generation_engine") == names("eval_engine") == set(ENGINES) == set(ENGINE_OPTIONS)
    assert names("advantage_estimator") == set(objective.ESTIMATORS)
    assert names("scale_rewards") == set(objective.SCALES)
    assert names("importance_sampling_level") == set(objective.IMPORTANCE_SAMPLING)
    assert names("loss_aggregation") == set(objective.AGGREGATIONS)
    assert names("mismatch_correction") == set(objective.MISMATCH_CORRECTIONS)
    assert names("parallelism") == set(PARALLELISMS)
    assert names("lr_scheduler") == set(known_schedules())
