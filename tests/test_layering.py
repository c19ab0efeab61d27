"""herd's import layering, checked from the package's own source (README, "Layout").

Every import between herd modules is read with `ast`, wherever it sits: at the top of a module,
inside a function (the lazy imports that keep `herd --help` fast), as `importlib.import_module`
of a literal name, or as an entry of a package's lazy table (`_LAZY = {"Name": ("herd.x", "Name")}`,
herd/_lazy.py). `from herd.inference import Engine` counts as an import of the module the lazy
table sends `Engine` to (herd.inference.engine), which is what runs when the name is touched.

`import herd` followed by `herd.load_model(…)` counts as an import of what `herd.load_model`
resolves to through herd/__init__.py's table (herd.inference.loading), not of the root package.

Three rules, over the whole graph of module → module imports:
  1. a module imports only from its own layer or the layers below it (LAYERS, lowest first);
  2. the packages of a pair in APART never import each other (herd.model / herd.data,
     herd.train / herd.inference), except for the imports EXCEPTIONS lists;
  3. no circles: modules may not import each other round in a loop, however indirectly (a circle
     hidden by imports inside functions still ties the modules into one unit).

Imports inside `if TYPE_CHECKING:` are not run and are not counted.
The checker is shown to fail on a synthetic package with a forbidden import (tmp_path).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

HERD = Path(__file__).resolve().parent.parent / "herd"

# Layers, lowest first: module-name prefixes (a prefix covers a package and everything under it).
# Names of packages that other engineers are adding (safety, serve, evals, train/sft …) are listed
# so their imports are checked as soon as they land; names that do not exist yet cost nothing.
LAYERS: list[list[str]] = [
    ["herd._lazy", "herd.config", "herd.presets"],                          # configuration
    ["herd.tokenizer", "herd.tokenizer_train", "herd.chat", "herd.image"],  # text and image formats
    ["herd.model", "herd.data"],                                            # the network; the data
    ["herd.train", "herd.inference", "herd.params"],                        # training stages; inference; counting
    ["herd.evals", "herd.eval", "herd.safety", "herd.serve"],               # built on a trained model
    ["herd.usecases", "herd.speedrun"],                                     # use cases; the whole recipe
    ["herd.cli", "herd.demo", "herd.__main__", "herd"],                     # the command line, the API table
]

# Packages of one layer that never import each other.
APART: list[tuple[str, str]] = [("herd.model", "herd.data"), ("herd.train", "herd.inference")]

# The exceptions, (importer prefix, imported prefix): post-training lives in herd/train/ and may
# generate with herd.inference (RL rollouts, samples for distillation, DPO pairs from the policy,
# samples during mid-training, pass@k for pruning); pre-training's loop and checkpoints may not, and herd.inference
# never imports herd.train.
EXCEPTIONS: set[tuple[str, str]] = {
    ("herd.train.rl", "herd.inference"),
    ("herd.train.sft", "herd.inference"),
    ("herd.train.dpo", "herd.inference"),
    ("herd.train.distill", "herd.inference"),
    ("herd.train.midtrain", "herd.inference"),
    ("herd.train.prune", "herd.inference"),  # SFT data pruning by pass@k of the model's own samples
}


# ----- reading the imports ---------------------------------------------------------------------------
def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under `root` → its file ('pkg.sub' for pkg/sub/__init__.py)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = f
    return out


def _lazy_table(tree: ast.Module) -> dict[str, str]:
    """A package __init__'s `_LAZY = {"Name": ("module", "attr"), ...}` → {Name: module}."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            table = {}
            if isinstance(node.value, ast.Dict):
                for k, v in zip(node.value.keys, node.value.values):
                    if (isinstance(k, ast.Constant) and isinstance(v, ast.Tuple) and v.elts
                            and isinstance(v.elts[0], ast.Constant)):
                        table[k.value] = v.elts[0].value
            return table
    return {}


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _raw_imports(tree: ast.Module, module: str, is_package: bool, package: str):
    """(imported module, imported name or None, line) for every import in the tree, at any depth;
    `import <package>` yields the package's attributes the module uses instead."""
    root_attrs = [(package, n.attr, n.lineno) for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Name) and n.value.id == package]
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                stack.extend(child.orelse)  # the else branch does run
                continue
            stack.append(child)
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == package and a.asname is None:
                    yield from root_attrs
                else:
                    yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from ..y import z
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[:len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            for a in node.names:
                yield base, a.name, node.lineno
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            yield node.args[0].value, None, node.lineno


def import_graph(root: Path, package: str = "herd") -> dict[str, dict[str, int]]:
    """{module: {imported module: first line}} among the package's own modules."""
    files = module_names(root, package)
    trees = {m: ast.parse(f.read_text(), filename=str(f)) for m, f in files.items()}
    lazy = {m: _lazy_table(t) for m, t in trees.items() if files[m].name == "__init__.py"}

    def resolve(base: str, name: str | None) -> str | None:
        if name is not None and f"{base}.{name}" in files:  # from pkg import submodule
            return f"{base}.{name}"
        if name is not None and name in lazy.get(base, {}):  # from pkg import Name (lazy table)
            return lazy[base][name]
        while base and base not in files:  # import pkg.mod.attr → the longest module prefix
            base = base.rpartition(".")[0]
        return base or None

    graph: dict[str, dict[str, int]] = {m: {} for m in files}
    for m, tree in trees.items():
        for base, name, line in _raw_imports(tree, m, files[m].name == "__init__.py", package):
            if base != package and not base.startswith(package + "."):
                continue
            target = resolve(base, name)
            if target is not None and target != m:
                graph[m].setdefault(target, line)
        for target in lazy.get(m, {}).values():
            if target in files and target != m:
                graph[m].setdefault(target, 1)
    return graph


# ----- the rules -------------------------------------------------------------------------------------
def _owner(module: str, layers) -> tuple[int, str] | None:
    """(layer index, the longest matching prefix) of a module; None when no layer names it."""
    best = None
    for i, prefixes in enumerate(layers):
        for p in prefixes:
            covers = module == p or ("." in p and module.startswith(p + "."))  # the root names only itself
            if covers and (best is None or len(p) > len(best[1])):
                best = (i, p)
    return best


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layering_errors(graph, layers, apart=(), exceptions=frozenset()) -> list[str]:
    """Imports that go up a layer or between the packages of an APART pair, and modules that no
    layer names."""
    errors = []
    for m in sorted(graph):
        own = _owner(m, layers)
        if own is None:
            errors.append(f"{m}: in no layer (add it to LAYERS)")
            continue
        for t, line in sorted(graph[m].items()):
            other = _owner(t, layers)
            if other is None:
                continue  # reported as its own module
            if other[0] > own[0]:
                errors.append(f"{m}:{line} imports {t}, a layer above it ({other[1]} over {own[1]})")
            elif (any((_under(m, a) and _under(t, b)) or (_under(m, b) and _under(t, a)) for a, b in apart)
                  and not any(_under(m, a) and _under(t, b) for a, b in exceptions)):
                errors.append(f"{m}:{line} imports {t}: {own[1]} and {other[1]} may not import each other "
                              "(APART; EXCEPTIONS lists the allowed imports)")
    return errors


def circles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def describe_circle(graph, comp: list[str]) -> str:
    """One loop through the component, with the line of each import: a → b (line) → … → a."""
    members = set(comp)
    path, seen, v = [comp[0]], {comp[0]}, comp[0]
    while True:
        nxt = next(w for w in sorted(graph[v]) if w in members and (w == comp[0] or w not in seen) and (
            w == comp[0] or any(u in members for u in graph[w])))
        path.append(f"{nxt} (line {graph[v][nxt]} of {v})")
        if nxt == comp[0]:
            return " → ".join(path)
        seen.add(nxt)
        v = nxt


def check(root: Path, package: str = "herd", layers=None, apart=None, exceptions=None) -> list[str]:
    layers = LAYERS if layers is None else layers
    apart = APART if apart is None else apart
    exceptions = EXCEPTIONS if exceptions is None else exceptions
    graph = import_graph(root, package)
    errors = layering_errors(graph, layers, apart, exceptions)
    errors += ["circle: " + describe_circle(graph, c) for c in circles(graph)]
    return errors


# ----- tests -----------------------------------------------------------------------------------------
def test_herd_imports_only_downward_and_without_circles():
    errors = check(HERD)
    assert not errors, "\n".join(errors)


def test_the_layer_table_names_every_package_in_herd():
    names = module_names(HERD, "herd")
    assert all(_owner(m, LAYERS) is not None for m in names)
    assert {"herd.model.weights", "herd.inference.engine", "herd.data.loader", "herd.train.trainer"} <= set(names)
    graph = import_graph(HERD)
    # the reader sees imports inside functions and through lazy tables, not just the top of a file
    assert "herd.model.llama4" in graph["herd.model.weights"]
    assert "herd.inference.engine" in graph["herd"]  # herd/__init__.py: "Engine": ("herd.inference.engine", …)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root


SYNTH_LAYERS = [["pkg.config"], ["pkg.model", "pkg.data"], ["pkg.inference", "pkg.train"], ["pkg"]]
SYNTH_APART = [("pkg.model", "pkg.data"), ("pkg.train", "pkg.inference")]
CLEAN = {
    "__init__.py": '_LAZY = {"Engine": ("pkg.inference.engine", "Engine")}\n',
    "config.py": "X = 1\n",
    "model/__init__.py": "",
    "model/net.py": "from pkg.config import X\n",
    "model/weights.py": "from pkg.model.net import X\n",
    "data/__init__.py": "",
    "data/loader.py": "import pkg.config\n",
    "inference/__init__.py": '_LAZY = {"Engine": ("pkg.inference.engine", "Engine")}\n',
    "inference/engine.py": "def f():\n    from pkg.model import weights\n    from . import cache\n",
    "inference/cache.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.inference.engine import E\n",
    "train/__init__.py": "",
    "train/loop.py": "from pkg.model.net import X\nfrom pkg.data import loader\n",
}


def test_a_clean_synthetic_tree_passes(tmp_path):
    root = _tree(tmp_path, CLEAN)
    assert check(root, "pkg", SYNTH_LAYERS, SYNTH_APART, set()) == []


@pytest.mark.parametrize("file, text, expect", [
    # the model layer reaching up into inference, from inside a function (weights.py → quant.py today)
    ("model/weights.py", "def load():\n    from pkg.inference.engine import Engine\n",
     "pkg.model.weights:2 imports pkg.inference.engine, a layer above it"),
    # through a lazy table: `from pkg.inference import Engine` is an import of pkg.inference.engine
    ("data/loader.py", "from pkg.inference import Engine\n", "pkg.data.loader:1 imports pkg.inference.engine"),
    # the packages of an APART pair
    ("data/loader.py", "import pkg.model.net\n", "pkg.data and pkg.model may not import each other"),
    ("inference/engine.py", "from pkg.train import loop\n", "pkg.inference and pkg.train may not import each other"),
    # `import pkg` then pkg.Engine: an import of what the root table resolves Engine to
    ("model/net.py", "import pkg\ndef f():\n    return pkg.Engine\n", "pkg.model.net:3 imports pkg.inference.engine"),
    # a relative import going up
    ("config.py", "from .model import net\n", "pkg.config:1 imports pkg.model.net, a layer above it"),
    # importlib with a literal name
    ("config.py", "import importlib\nm = importlib.import_module('pkg.data.loader')\n", "a layer above it"),
    # a circle inside one layer, hidden in a function
    ("model/net.py", "from pkg.config import X\ndef f():\n    from pkg.model.weights import W\n",
     "circle: pkg.model.net → pkg.model.weights (line 3 of pkg.model.net) → pkg.model.net (line 1 of pkg.model.weights)"),
    # a module no layer names
    ("extra.py", "", "pkg.extra: in no layer"),
])
def test_a_forbidden_import_fails_the_check(tmp_path, file, text, expect):
    root = _tree(tmp_path, {**CLEAN, file: text})
    errors = check(root, "pkg", SYNTH_LAYERS, SYNTH_APART, set())
    assert any(expect in e for e in errors), errors


def test_a_listed_exception_is_allowed(tmp_path):
    root = _tree(tmp_path, {**CLEAN, "train/rl.py": "from pkg.inference.engine import Engine\n"})
    assert check(root, "pkg", SYNTH_LAYERS, SYNTH_APART, set()) != []
    assert check(root, "pkg", SYNTH_LAYERS, SYNTH_APART, {("pkg.train.rl", "pkg.inference")}) == []
