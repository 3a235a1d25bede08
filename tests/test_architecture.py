"""The house rules of include/retrain, checked on the source (no imports, so a broken module still gets a clear line).

- no import cycle among the package's modules, imports inside functions included;
- no module over 800 lines;
- the environment is read in retrain/settings.py only (and the CLI's process set-up);
- run-directory artifact names are spelled in retrain/rundir.py only;
- DAG files do not declare Params by hand (they are generated from the pydantic RunParams).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "include" / "retrain"
MAX_LINES = 800


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports (at any depth of the file: function-level imports count)."""
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)

    def resolve(target: str) -> str | None:
        while target and target not in mods:
            if "." not in target:
                return None
            target = target.rsplit(".", 1)[0]
        return target or None

    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" for a in node.names] + [module]
            for target in targets:
                if target.startswith("retrain"):
                    hit = resolve(target)
                    if hit and hit != name:
                        graph[name].add(hit)
                        break
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module are cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    nodes = set(graph) | {m for targets in graph.values() for m in targets}
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert [c for c in strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) if len(c) > 1] == [
        ["a", "b", "c"]]


def test_no_import_cycles_in_the_package():
    cycles = [c for c in strongly_connected(import_graph()) if len(c) > 1]
    assert not cycles, f"import cycles (imports inside functions count): {cycles}"


def test_lower_modules_never_import_the_orchestrator():
    graph = import_graph()
    offenders = sorted(m for m, targets in graph.items()
                       if "retrain.stages" in targets and not m.startswith("retrain.cli"))
    assert not offenders, f"only the CLI may import retrain.stages (tasks call it from the DAG files): {offenders}"


def test_no_module_over_800_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines()) for p in _modules().values()}
    sizes |= {str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines())
              for p in [*(REPO / "dags").glob("*.py"), *(REPO / "plugins").rglob("*.py")]}
    big = {k: v for k, v in sizes.items() if v > MAX_LINES}
    assert not big, f"split these modules (> {MAX_LINES} lines): {big}"


_ENV = re.compile(r"\bos\.environ\b|\bos\.getenv\b|\bgetenv\(")


def test_environment_is_read_in_settings_only():
    allowed = {PACKAGE / "settings.py"}
    allowed |= set((PACKAGE / "cli").glob("*.py"))  # the CLI's process set-up (AIRFLOW_HOME, embedded services)
    files = [*_modules().values(), *(REPO / "dags").glob("*.py"), *(REPO / "plugins").rglob("*.py")]
    readers = sorted(str(p.relative_to(REPO)) for p in files if p not in allowed and _ENV.search(p.read_text()))
    assert not readers, f"read the environment through retrain.settings instead: {readers}"


_ARTIFACT = re.compile(
    r"""["'](run_config|batch|collect|rejected|train|val|test|manifest|validation|summary|decision|backup|metrics|models|"""
    r"""train_result|registered|run_fingerprint|train_overrides|openai_job|openai_format_check|openai_events)"""
    r"""\.jsonl?["']""")


def test_artifact_file_names_are_spelled_once():
    offenders = {}
    for path in [*_modules().values(), *(REPO / "dags").glob("*.py"), *(REPO / "plugins").rglob("*.py")]:
        if path.name == "rundir.py":
            continue
        hits = _ARTIFACT.findall(path.read_text(encoding="utf-8"))
        if hits:
            offenders[str(path.relative_to(REPO))] = sorted(set(hits))
    assert not offenders, f"use retrain.rundir.RunDir for run-directory files: {offenders}"


def test_dag_files_declare_no_params_by_hand():
    for path in (REPO / "dags").glob("retrain_*.py"):
        assert "Param(" not in path.read_text(), f"{path.name}: generate Params from retrain.schemas (RunParams)"
