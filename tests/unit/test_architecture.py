"""The shape of the package: dependencies point one way without circles, config schemas are
leaves, library packages import no entry point, functions stay short, the config directory is
defined once (docs/architecture.md)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "mm_moe"

# Lowest first: a module may import from its own layer or a lower one (longest prefix wins).
LAYERS = [
    (
        "base",
        [
            "mm_moe.errors",
            "mm_moe.modality",
            "mm_moe.utils",
            "mm_moe.config.validate",
            "mm_moe.config.legacy",  # saved configs' dicts upgraded: plain dict edits, no imports
        ],
    ),
    ("model", ["mm_moe.model"]),
    ("components", ["mm_moe.tokenization", "mm_moe.parallel", "mm_moe.data"]),
    ("checkpoint", ["mm_moe.checkpoint"]),
    (
        "run",
        [
            "mm_moe.trainer",
            "mm_moe.eval",
            "mm_moe.config",
            "mm_moe.sampling",
            "mm_moe.upcycle",
        ],
    ),
    (
        "entry",
        [
            "mm_moe",
            "mm_moe.api",
            "mm_moe.cli",
            "mm_moe.train",
            "mm_moe.plan",
            "mm_moe.generate",
            "mm_moe.export",
            "mm_moe.train_text_tokenizer",
            "mm_moe.train_image_tokenizer",
            "mm_moe.upcycle_command",
        ],
    ),
]
# Same-layer imports that would make a cycle between peers.
FORBIDDEN = [
    ("mm_moe.tokenization", "mm_moe.data"),
    ("mm_moe.tokenization", "mm_moe.parallel"),
    ("mm_moe.parallel", "mm_moe.data"),
    ("mm_moe.parallel", "mm_moe.tokenization"),
    ("mm_moe.eval", "mm_moe.trainer"),
    ("mm_moe.upcycle", "mm_moe.trainer"),
    ("mm_moe.sampling", "mm_moe.trainer"),
]
# Entry points share only the CLI helpers and the public Python API.
ENTRY_SHARED = ("mm_moe.cli", "mm_moe.api")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> tuple[int, str]:
    best = (-1, -1, "")
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                best = max(best, (len(prefix), rank, prefix))
    assert best[1] >= 0, f"{module} is in no layer"
    return best[1], best[2]


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mm_moe"):
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("mm_moe")]
    return found


def _resolves(name: str) -> bool:
    parts = name.split(".")
    base = REPO.joinpath(*parts)
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_config_module(module: str) -> bool:
    return module.endswith(".config") or module.startswith("mm_moe.config.")


def _runtime_imports(node: ast.AST, deferred: bool = True) -> list[tuple[int, str]]:
    """The mm_moe imports that can run: at module level, and inside functions when `deferred`
    (a deferred import closes a circle as soon as its function runs); never the ones in
    `if TYPE_CHECKING:` blocks."""
    found = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found += _imports(child)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not deferred:
            continue
        elif _is_type_checking(child):
            found += _runtime_imports(ast.Module(body=child.orelse, type_ignores=[]), deferred)
        else:
            found += _runtime_imports(child, deferred)
    return found


def _module_of(name: str) -> str | None:
    """The module an imported name loads: `pkg.mod` for `from pkg import mod` and for
    `from pkg.mod import func`; None outside the package."""
    while name and not _resolves(name):
        name = name.rpartition(".")[0]
    return name or None


def _import_graph(deferred: bool = True) -> dict[str, set[str]]:
    """module -> the mm_moe modules it imports (with the packages above them that it is not
    inside: importing `a.b.c` first runs `a/__init__` and `a/b/__init__`). A config module
    counts only at import time: its build() reaches down to the component it configures,
    which may import the config back (configs are leaves when imported, factories when
    called; the layering test still checks where build() reaches)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        targets = set()
        tree = ast.parse(path.read_text())
        for _, name in _runtime_imports(tree, deferred and not _is_config_module(source)):
            target = _module_of(name)
            while target and target != source and not source.startswith(target + "."):
                targets.add(target)
                target = target.rpartition(".")[0]
        graph[source] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of modules (Tarjan), as [a, b, ..., a]."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1 or node in graph.get(node, ()):
                cycles.append(_circle_through(graph, set(group), node))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _circle_through(graph: dict[str, set[str]], group: set[str], start: str) -> list[str]:
    """A shortest path from `start` back to itself inside its strongly connected group."""
    paths, seen = [[start]], set()
    while paths:
        path = paths.pop(0)
        for nxt in sorted(graph.get(path[-1], set()) & group):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append([*path, nxt])
    raise AssertionError(f"no circle through {start}")


def test_find_cycles_names_each_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_runtime_imports_include_functions_but_not_type_checking():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import mm_moe.errors\n"
        "if TYPE_CHECKING:\n    from mm_moe.model.decoder import EarlyFusionDecoder\n"
        "else:\n    from mm_moe import modality\n"
        "class A:\n    def build(self):\n        from mm_moe.model.mlp import SwiGLU\n"
    )
    names = {name for _, name in _runtime_imports(tree)}
    assert {"mm_moe.errors", "mm_moe.modality", "mm_moe.model.mlp"} <= names
    assert "mm_moe.model.decoder" not in names
    assert "mm_moe.model.mlp" not in {name for _, name in _runtime_imports(tree, deferred=False)}


def test_imports_point_from_higher_layers_to_lower_ones():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        rank, prefix = _layer(source)
        for line, target in _imports(ast.parse(path.read_text())):
            if not _resolves(target):  # `from pkg import name`: the name is not a module
                continue
            target_rank, target_prefix = _layer(target)
            where = f"{path.relative_to(REPO)}:{line} imports {target}"
            if target_rank > rank:
                wrong.append(f"{where} (layer {LAYERS[target_rank][0]} > {LAYERS[rank][0]})")
            elif (prefix, target_prefix) in FORBIDDEN:
                wrong.append(f"{where} (a cycle between peers)")
            elif (
                rank == target_rank == len(LAYERS) - 1
                and target_prefix not in (prefix, *ENTRY_SHARED)
                and target_prefix != "mm_moe"
            ):
                wrong.append(f"{where} (entry points share only {ENTRY_SHARED})")
    # Circles, deferred imports included: a module of the circle sees the others half-initialised.
    wrong += [" -> ".join(cycle) + " (an import circle)" for cycle in find_cycles(_import_graph())]
    assert not wrong, "\n".join(wrong)


# Library modules that keep a command's old name (`python -m mm_moe.<package>.<module>`): they
# run the entry point as the program and import nothing.
COMMAND_ALIASES = {
    "mm_moe.tokenization.train_text": "mm_moe.train_text_tokenizer",
    "mm_moe.tokenization.train_image": "mm_moe.train_image_tokenizer",
    "mm_moe.upcycle.__main__": "mm_moe.upcycle_command",
}


def _entry_points() -> set[str]:
    """The top of the stack: mm_moe/cli.py, the top-level modules that use it (the commands),
    and mm_moe/api.py (the public Python API, re-exported by `mm_moe`). The other top-level
    modules are library code a package may import: the leaves `errors` and `modality`, and
    `sampling` and `plan_memory` (run layer)."""
    found = {"mm_moe.cli", "mm_moe.api"}
    for path in PACKAGE.glob("*.py"):
        if any(t == "mm_moe.cli" for _, t in _imports(ast.parse(path.read_text()))):
            found.add(_module_name(path))
    return found


def test_library_packages_import_no_entry_point():
    entries = _entry_points()
    wrong = {}
    for path in sorted(PACKAGE.glob("*/**/*.py")):
        for line, target in _imports(ast.parse(path.read_text())):
            if _module_of(target) in entries:
                wrong[f"{path.relative_to(REPO)}:{line} imports {_module_of(target)}"] = None
    assert not wrong, "\n".join(wrong)
    assert {"mm_moe.train", "mm_moe.train_text_tokenizer", "mm_moe.upcycle_command"} <= entries
    assert "mm_moe.api" in entries  # the public Python API is the top of the stack too


def test_command_aliases_only_run_their_entry_point():
    entries = _entry_points()
    for alias, entry in COMMAND_ALIASES.items():
        tree = ast.parse(REPO.joinpath(*alias.split(".")).with_suffix(".py").read_text())
        imports = [
            ast.unparse(n) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
        ]
        assert imports == ["import runpy"] and entry in entries, alias
        assert f"runpy.run_module({entry!r}" in ast.unparse(tree), alias
    # An old command still reaches its entry point: a config mistake, reported by it (the
    # package form, `python -m mm_moe.upcycle`, too).
    commands = {
        "mm_moe.tokenization.train_text": ([], "give text to train on"),
        "mm_moe.upcycle": (["out=x"], "source=PATH is required"),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", name, *args], cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        for name, (args, _) in commands.items()
    }
    for name, proc in procs.items():
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == 2 and commands[name][1] in err, (name, err)


def _model_code() -> set[str]:
    """Modules that define torch modules (a class deriving from nn.Module or a subclass)."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                if bases & {"nn.Module", "torch.nn.Module", "Module"}:
                    found.add(_module_name(path))
    return found


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_config_dataclasses_import_no_model_code():
    """Every `*Config` dataclass can be imported without loading a torch model module: the
    schemas of configs/ live in `*/config.py` modules, which import only each other."""
    graph, model_code = _import_graph(deferred=False), _model_code()
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for node in ast.parse(path.read_text()).body:
            decorators = {ast.unparse(d).split("(")[0] for d in getattr(node, "decorator_list", [])}
            if not (isinstance(node, ast.ClassDef) and node.name.endswith("Config")):
                continue
            if not decorators & {"dataclass", "dataclasses.dataclass"}:
                continue
            loaded = sorted(({module} | _closure(graph, module)) & model_code)
            if loaded:
                wrong.append(f"{module}.{node.name}: importing it loads {loaded}")
    assert model_code and not wrong, "\n".join(wrong)


def test_the_schema_imports_only_config_modules():
    graph = _import_graph(deferred=False)
    packages = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    for module in ("mm_moe.config", "mm_moe.config.schema"):
        others = {t for t in graph[module] if not _is_config_module(t)} - packages
        assert others <= {"mm_moe.errors", "mm_moe.modality"}, (module, sorted(others))


def test_importing_the_config_schema_loads_no_model_code():
    code = (
        "import json, sys; from mm_moe.config import TrainConfig; print(json.dumps([*sys.modules]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert "mm_moe.config.schema" in loaded
    assert "mm_moe.model.moe.layer" not in loaded
    assert not loaded & _model_code(), sorted(loaded & _model_code())
    assert not {m for m in loaded if m.split(".")[0] == "torch"}, "the schemas load torch"


def test_no_function_is_longer_than_60_lines():
    long = []
    sources = [PACKAGE, REPO / "scripts", REPO / "data_pipelines"]
    for path in sorted(p for root in sources for p in root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines}")
    assert not long, "\n".join(long)


def test_the_config_directory_is_defined_once():
    definitions = [
        str(p.relative_to(REPO))
        for p in PACKAGE.rglob("*.py")
        if "CONFIG_DIR =" in p.read_text() or "CONFIG_DIR=" in p.read_text()
    ]
    assert definitions == ["mm_moe/cli.py"], definitions


def test_no_parallel_module_imports_the_checkpoint_package():
    """parallel/ hands over and takes back the engine's tensors by name; reading, upgrading
    and naming what is on disk is checkpoint/'s job, so parallel/ never imports it."""
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in sorted((PACKAGE / "parallel").rglob("*.py"))
        for line, name in _runtime_imports(ast.parse(path.read_text()))
        if name == "mm_moe.checkpoint" or name.startswith("mm_moe.checkpoint.")
    ]
    assert not wrong, "\n".join(wrong)


_SIDES = ("mm_moe.checkpoint", "mm_moe.parallel")


def _side(module: str) -> str | None:
    return next((s for s in _SIDES if module == s or module.startswith(s + ".")), None)


def _crossings(fn) -> list[str]:
    """Every call from a checkpoint/ module into a parallel/ one or back while `fn` runs, in
    call order, as 'caller module -> callee module' (the caller: the nearest frame of either
    package, so calls through torch or deepspeed count too)."""
    found = []

    def profile(frame, event, arg):
        callee = frame.f_globals.get("__name__", "")
        if event != "call" or _side(callee) is None:
            return
        caller = frame.f_back
        while caller is not None and _side(caller.f_globals.get("__name__", "")) is None:
            caller = caller.f_back
        if caller is not None:
            name = caller.f_globals["__name__"]
            if _side(name) != _side(callee):
                found.append(f"{name} -> {callee}")

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return found


def test_save_and_resume_cross_from_checkpoint_to_parallel_once(tmp_path):
    """Counted, call by call: saving asks parallel/ for the engine's tensors once, resuming
    hands them back once, and parallel/ never calls into checkpoint/."""
    from mm_moe.checkpoint import state
    from tests.unit.test_checkpoint_layout import StubLoader, moe_engine

    engine, calls = moe_engine(), {}

    def save():
        staged = state.stage(state.TrainState(7, engine, StubLoader(), {}, 0, 1))
        calls["dir"] = state.write(staged, tmp_path, keep_last=1)

    calls["save"] = _crossings(save)
    calls["resume"] = _crossings(lambda: state.load(calls["dir"], engine, StubLoader(), 0, 1))
    assert calls["save"] == ["mm_moe.checkpoint.state -> mm_moe.parallel.full_state"], calls
    assert calls["resume"] == ["mm_moe.checkpoint.state -> mm_moe.parallel.full_state"], calls


def _config_classes() -> dict[str, str]:
    """Config dataclass name -> the config module that defines it."""
    homes = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if _is_config_module(module):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
                    homes[node.name] = module
    return homes


def test_config_classes_are_imported_from_their_config_module():
    """One import path per config class: its `*/config.py` (or a config package re-export,
    or the public API), never a runtime module that happens to import it."""
    homes, wrong = _config_classes(), []
    for root in (PACKAGE, REPO / "tests", REPO / "scripts", REPO / "data_pipelines"):
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom) or not node.module:
                    continue
                public = node.module in ("mm_moe", "mm_moe.api")
                if _is_config_module(node.module) or public:
                    continue
                for alias in node.names:
                    if alias.name in homes and node.module.startswith("mm_moe"):
                        where = f"{path.relative_to(REPO)}:{node.lineno}"
                        wrong.append(f"{where} {alias.name} from {node.module}")
    assert not wrong, "\n".join(wrong)
