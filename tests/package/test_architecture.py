"""Static architecture checks: the layering of ``docs/architecture.md``, enforced by parsing.

Pure ``ast`` analysis of every ``.py`` file under ``src/causalpatch`` (or under
``$CAUSALPATCH_ARCH_ROOT``); nothing is imported, so it runs well under a second. Imports are
read at module level and inside functions/methods; relative imports are resolved
(``from ..errors import x`` in ``causalpatch.adapters.llama`` -> ``causalpatch.errors``);
``from .pkg import sub`` where ``sub`` is a submodule counts as an import of
``causalpatch.pkg.sub``. A package's ``__init__.py`` is the package (``causalpatch.adapters``).

Rules (one test each):

1. No import cycles between causalpatch modules. Function-level imports count (they still
   couple the modules); imports under ``if TYPE_CHECKING:`` do not (they never execute).
2. Imports point down the pipeline: a module imports only modules of strictly lower rank in
   ``RANKS`` (copied from docs/architecture.md), or modules of its own top-level package
   (``adapters.*`` among themselves, ``render.*`` among themselves). A dotted key (``sae.train``)
   ranks that submodule apart from its package: it is then a group of its own, so it and the
   rest of the package import each other only downwards. TYPE_CHECKING imports do not count.
   Every module must be in the table.
3. No ``_private`` names across modules: ``from X import _name`` and ``X._name`` (``X`` bound by
   ``import causalpatch.x as X`` / ``from . import x``) are forbidden when ``X`` is another
   causalpatch module, including the module's own package ``__init__``. Dunders are fine, and so
   is importing a private *module* such as ``_io`` (its public functions are its interface).
4. Methods never import each other: ``causalpatch.methods.X`` must not import
   ``causalpatch.methods.Y`` nor the ``causalpatch.methods`` package (which re-exports them).
5. Only ``adapters/`` knows Hugging Face internals. Elsewhere it is an error to (a) write a
   string naming a Hugging Face module path component (``HF_PATH_PARTS``, ``model.layers``,
   ``transformer.h``; matched as whole dotted-path components) or access such an attribute
   (``layer.self_attn``, ``hf.model.layers``), (b) use a calling-convention
   keyword (``HF_KEYWORDS``) as a call keyword, an attribute, or a string (dict keys included),
   (c) import ``transformers.cache_utils`` or ``transformers.models.*``. Strings that are
   docstrings, or that sit inside a ``raise`` statement (error messages may tell users which raw
   names they can type), are exempt; every other string counts. TYPE_CHECKING blocks count here:
   naming a Hugging Face type is knowledge of it even when only a type checker runs the import.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGE = "causalpatch"
ROOT = Path(os.environ.get("CAUSALPATCH_ARCH_ROOT")
            or REPO_ROOT / "src" / PACKAGE)
TABLE_HINT = "the rank table in docs/architecture.md and tests/package/test_architecture.py"

# Rank of each top-level module; a package's rank covers all its submodules, except those with a
# dotted key of their own ("sae.train" overrides "sae"; the longest matching key wins). "__init__"
# is the root.
RANKS: dict[str, int] = {
    "errors": 0, "_io": 0, "enums": 1, "adapters": 1, "names": 2, "hooks": 3, "tokens": 4,
    "interventions": 5, "loading": 6, "sae": 6, "tracing": 7, "model": 8, "metrics": 9, "plan": 10,
    "engine": 11, "checkpoint": 12, "render": 13, "result": 14, "assemble": 15, "datasets": 16,
    "executors": 16, "options": 17,
    "methods": 18, "sae.train": 18, "interpretable": 19, "framework": 19, "cli": 20, "__init__": 20,
    "graph": 14, "__main__": 21,
}
METHODS = f"{PACKAGE}.methods"
ADAPTERS = f"{PACKAGE}.adapters"

HF_PATH_PARTS = frozenset({
    "self_attn", "o_proj", "q_proj", "k_proj", "v_proj", "down_proj", "up_proj", "gate_proj",
    "embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm", "gpt_neox",
    "c_attn", "c_proj", "query_key_value", "dense_4h_to_h",
})
HF_PATH_PAIRS = (("model", "layers"), ("transformer", "h"))  # only as consecutive components
HF_KEYWORDS = frozenset({
    "past_key_values", "layer_past", "logits_to_keep", "use_cache", "hidden_states",
    "cache_position", "position_embeddings", "output_hidden_states", "output_attentions",
})
HF_FORBIDDEN_MODULES = ("transformers.cache_utils", "transformers.models")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*")


@dataclass(frozen=True)
class Module:
    name: str  # dotted module name, e.g. "causalpatch.adapters.llama"
    where: str  # display path, e.g. "causalpatch/adapters/llama.py"
    tree: ast.Module
    is_package: bool
    nodes: tuple[tuple[ast.AST, bool], ...]  # every node, and whether under `if TYPE_CHECKING:`


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    where: str  # "causalpatch/engine.py:256"
    target: str  # imported module, absolute
    names: tuple[str, ...]  # names taken by `from target import ...`; () for a module import
    binding: tuple[str, str] | None  # (local name, module it is bound to), if a module is bound
    runtime: bool  # False under `if TYPE_CHECKING:`


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _group(module: str) -> str:
    """The ``RANKS`` key of a module: its longest dotted key ("sae.train" for
    causalpatch.sae.train), else its top-level component ("adapters" for
    causalpatch.adapters.llama)."""
    parts = module.split(".")[1:]
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in RANKS:
            return ".".join(parts[:n])
    return parts[0] if parts else "__init__"


def _in_package(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


@lru_cache(maxsize=None)
def load_modules(root: Path) -> dict[str, Module]:
    """Parse every ``.py`` file under ``root`` (the folder of the ``causalpatch`` package)."""
    modules: dict[str, Module] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        is_package = rel.name == "__init__.py"
        parts = rel.parent.parts if is_package else (*rel.parent.parts, rel.stem)
        name = ".".join((PACKAGE, *parts))
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        modules[name] = Module(name, f"{PACKAGE}/{rel.as_posix()}", tree, is_package,
                               tuple(_walk(tree)))
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(tree: ast.AST) -> Iterator[tuple[ast.AST, bool]]:
    """Every node below ``tree`` in source order, with whether it is under ``if TYPE_CHECKING:``."""
    todo = [(child, False) for child in reversed(list(ast.iter_child_nodes(tree)))]
    while todo:
        node, guarded = todo.pop()
        yield node, guarded
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = [(c, True) for c in node.body] + [(c, guarded) for c in node.orelse]
        else:
            children = [(c, guarded) for c in ast.iter_child_nodes(node)]
        todo.extend(reversed(children))


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


@lru_cache(maxsize=None)
def collect_imports(root: Path) -> tuple[Import, ...]:
    """Every import statement of every module (causalpatch and external targets)."""
    modules = load_modules(root)
    found: list[Import] = []
    for mod in modules.values():
        for node, guarded in mod.nodes:
            where = f"{mod.where}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                for a in node.names:  # `import a.b as X` binds X to a.b; `import a.b` binds a
                    binding = (a.asname, a.name) if a.asname else (a.name.split(".")[0],) * 2
                    found.append(Import(mod.name, where, a.name, (), binding, not guarded))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, node)
                names: list[str] = []
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in modules:  # a submodule: an import of that module
                        found.append(Import(mod.name, where, sub, (), (a.asname or a.name, sub),
                                            not guarded))
                    else:
                        names.append(a.name)
                if names:
                    found.append(Import(mod.name, where, base, tuple(names), None, not guarded))
    return tuple(found)


def _internal_runtime_edges(root: Path) -> list[Import]:
    modules = load_modules(root)
    return [i for i in collect_imports(root)
            if i.runtime and i.target in modules and i.target != i.source]


def check_cycles(root: Path = ROOT) -> list[str]:
    """Rule 1: one message per strongly connected set of modules, showing one cycle in it."""
    graph: dict[str, dict[str, str]] = {m: {} for m in load_modules(root)}
    for imp in _internal_runtime_edges(root):
        graph[imp.source].setdefault(imp.target, imp.where)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while (top := stack.pop()) != node:
                component.append(top)
            components.append(sorted([node, *component]))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    messages = []
    for comp in sorted(c for c in components if len(c) > 1):
        start, members = comp[0], set(comp)
        paths: dict[str, list[str]] = {start: [start]}  # breadth-first: a shortest cycle
        queue, cycle = [start], None
        while queue and cycle is None:
            node = queue.pop(0)
            for nxt in sorted(graph[node]):
                if nxt == start:
                    cycle = [*paths[node], start]
                    break
                if nxt in members and nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    queue.append(nxt)
        assert cycle is not None
        steps = " -> ".join(f"{b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:]))
        messages.append(f"{start} -> {steps}  [cycle set: {', '.join(comp)}]; break it by "
                        "moving the shared code into a lower-rank module (docs/architecture.md)")
    return messages


def check_ranks(root: Path = ROOT) -> list[str]:
    """Rule 2: runtime imports go to strictly lower ranks or stay within the module's package."""
    modules = load_modules(root)
    messages = [f"{m.where}: add {name} to {TABLE_HINT}"
                for name, m in modules.items() if _group(name) not in RANKS]
    for imp in collect_imports(root):
        if not imp.runtime or not _in_package(imp.target) or _group(imp.source) not in RANKS:
            continue
        src, dst = _group(imp.source), _group(imp.target)
        if dst not in RANKS:
            why = ("is not in the rank table (add it)" if imp.target in modules
                   else "does not exist (fix the import)")
            messages.append(f"{imp.where}: {imp.source} imports {imp.target}, which {why}")
        elif src != dst and RANKS[dst] >= RANKS[src]:
            messages.append(
                f"{imp.where}: {imp.source} (rank {RANKS[src]}) imports {imp.target} (rank "
                f"{RANKS[dst]}); only strictly lower ranks may be imported. Move what it needs "
                f"below rank {RANKS[src]} (or change the table), or pass it in from the caller")
    return messages


def check_private_imports(root: Path = ROOT) -> list[str]:
    """Rule 3: ``from X import _name`` and ``X._name`` for another causalpatch module X."""
    modules = load_modules(root)
    imports = collect_imports(root)
    messages = [f"{i.where}: {i.source} imports private {name!r} from {i.target}"
                for i in imports if _in_package(i.target) and i.target != i.source
                for name in i.names if _is_private(name)]
    for mod in modules.values():
        bound = dict(i.binding for i in imports
                     if i.source == mod.name and i.binding and _in_package(i.binding[1]))

        def module_of(expr: ast.expr) -> str | None:
            if isinstance(expr, ast.Name):
                return bound.get(expr.id)
            if isinstance(expr, ast.Attribute) and (base := module_of(expr.value)):
                return f"{base}.{expr.attr}" if f"{base}.{expr.attr}" in modules else None
            return None

        for node, _ in mod.nodes:
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                target = module_of(node.value)
                if target and target != mod.name:
                    messages.append(f"{mod.where}:{node.lineno}: {mod.name} uses private "
                                    f"{target}.{node.attr}")
    return messages


def check_methods_independent(root: Path = ROOT) -> list[str]:
    """Rule 4: no ``causalpatch.methods.X`` imports another method or the methods package."""
    return [f"{i.where}: {i.source} imports {i.target}; methods never import each other. Move "
            "the shared code down the pipeline (plan, engine or assemble) and import it from there"
            for i in _internal_runtime_edges(root)
            if i.source.startswith(METHODS + ".")
            and (i.target == METHODS or i.target.startswith(METHODS + "."))]


def _exempt_strings(mod: Module) -> set[int]:
    """ids of string constants that are docstrings or part of a ``raise`` statement."""
    exempt: set[int] = set()
    for node in (mod.tree, *(n for n, _ in mod.nodes)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant):
            exempt.add(id(body[0].value))
        if isinstance(node, ast.Raise):
            exempt.update(id(n) for n in ast.walk(node))
    return exempt


def hf_words(text: str) -> list[str]:
    """The Hugging Face path components and calling-convention keywords named in ``text``."""
    hits = []
    for dotted in _DOTTED.findall(text):
        parts = dotted.split(".")
        hits += [p for p in parts if p in HF_PATH_PARTS or p in HF_KEYWORDS]
        hits += [".".join(pair) for pair in HF_PATH_PAIRS
                 if any(tuple(parts[k:k + 2]) == pair for k in range(len(parts) - 1))]
    return hits


def _hf_attribute(node: ast.Attribute) -> str | None:
    """``hidden_states``/``self_attn`` for ``x.hidden_states``/``x.self_attn``; ``model.layers``."""
    if node.attr in HF_KEYWORDS or node.attr in HF_PATH_PARTS:
        return node.attr
    owner = node.value
    owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)
    return next((".".join(p) for p in HF_PATH_PAIRS if p == (owner_name, node.attr)), None)


def check_hf_internals(root: Path = ROOT) -> list[str]:
    """Rule 5: Hugging Face paths, calling conventions and internal modules stay in adapters/."""
    messages = []
    outside = {n: m for n, m in load_modules(root).items()
               if n != ADAPTERS and not n.startswith(ADAPTERS + ".")}
    for i in collect_imports(root):
        named = (i.target, *(f"{i.target}.{n}" for n in i.names))
        bad = [n for n in named
               if any(n == f or n.startswith(f + ".") for f in HF_FORBIDDEN_MODULES)]
        if i.source in outside and bad:
            messages.append(f"{i.where}: imports {bad[0]}")
    for mod in outside.values():
        exempt = _exempt_strings(mod)
        for node, _ in mod.nodes:
            line = f"{mod.where}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.keyword) and node.arg in HF_KEYWORDS:
                messages.append(f"{line}: keyword argument {node.arg}=")
            elif isinstance(node, ast.Attribute) and (hits := _hf_attribute(node)):
                messages.append(f"{line}: attribute .{hits}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in exempt and (hits := hf_words(node.value)):
                messages.append(f"{line}: string {node.value[:60]!r} names {', '.join(hits)}")
    return messages


def _fail_if(messages: list[str], what: str, fix: str = "") -> None:
    if messages:
        pytest.fail(f"{what} ({len(messages)}; see docs/architecture.md):\n  "
                    + "\n  ".join(messages) + (f"\nFix: {fix}" if fix else ""), pytrace=False)


def test_no_import_cycles() -> None:
    _fail_if(check_cycles(), "import cycles (function-level imports count, TYPE_CHECKING not)")


def test_imports_point_down_the_pipeline() -> None:
    _fail_if(check_ranks(), "imports that do not point down the pipeline")


def test_no_private_imports_across_modules() -> None:
    _fail_if(check_private_imports(), "private names used across modules",
             "make the name public in its module (drop the underscore, document it), or move "
             "the code that needs it into that module")


def test_methods_never_import_each_other() -> None:
    _fail_if(check_methods_independent(), "methods importing each other")


def test_only_adapters_know_hugging_face_internals() -> None:
    _fail_if(check_hf_internals(), "Hugging Face internals outside adapters/",
             "move the Hugging Face detail into causalpatch/adapters/ (a field or method of the "
             "Adapter, e.g. how a layer is called or where the cache lives) and call that instead")


SYNTHETIC: dict[str, str] = {
    "__init__.py": "from . import names\n",
    "errors.py": "def late():\n    from .names import resolve\n",  # upward, and a 2-cycle
    "names.py": "from .errors import late\n",
    "plan.py": "def _helper(): ...\n",
    "engine.py": ("from . import plan\nfrom .plan import _helper\nimport causalpatch.plan as p\n"
                  "def run():\n    return plan._helper(), p._helper(), plan.__name__\n"),
    "model.py": "from .tracing import Trace\n",
    "tracing.py": ("from typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    from .model import M\n"),
    "metrics.py": ('"""About self_attn and past_key_values."""\n'
                   "def f(m, n):\n"
                   "    if n:\n        raise ValueError('raw paths like model.layers.3.mlp work')\n"
                   "    return m(n, past_key_values=None), 'model.layers.0.self_attn'\n"
                   "def g(hf):\n    return hf.model.layers, hf.lm_head, hf.model.norm\n"),
    "hooks.py": "def g():\n    from transformers.cache_utils import Cache\n",
    "extra.py": "",
    "methods/__init__.py": "from .a import run\n",
    "methods/a.py": "from .b import run\nfrom ..errors import late\n",
    "methods/b.py": "from causalpatch.methods import a\ndef run(): ...\n",
    "adapters/__init__.py": "from . import llama\n",
    "sae/__init__.py": "from .core import encode\nfrom .train import fit\n",  # 6 -> 17
    "sae/core.py": "def encode(): ...\n",
    "sae/train.py": "from ..model import M\nfrom .core import encode\ndef fit(): ...\n",
    "adapters/llama.py": ("from transformers.models.llama import LlamaModel\n"
                          "from .. import adapters\nfrom . import _registry\n"
                          "def call(layer, h):\n    return layer(h, past_key_values=None)\n"),
}


def test_checker_catches_each_kind_of_violation(tmp_path: Path) -> None:
    root = tmp_path / PACKAGE
    for rel, source in SYNTHETIC.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(source)
    edges = {(i.source, i.target) for i in _internal_runtime_edges(root)}
    assert ("causalpatch.methods.a", "causalpatch.methods.b") in edges  # relative resolution
    assert ("causalpatch.methods.a", "causalpatch.errors") in edges  # `from ..errors`
    assert ("causalpatch", "causalpatch.names") in edges  # `from . import names`
    assert ("causalpatch.tracing", "causalpatch.model") not in edges  # TYPE_CHECKING

    def text(check: Callable[[Path], list[str]]) -> str:
        return "\n".join(check(root))

    cycles = text(check_cycles)
    assert "causalpatch.errors -> causalpatch.names (causalpatch/errors.py:2)" in cycles
    assert "causalpatch.methods.a -> causalpatch.methods.b" in cycles
    assert "causalpatch.adapters -> causalpatch.adapters.llama" in cycles  # `from .. import`
    assert "tracing" not in cycles and "model" not in cycles

    ranks = text(check_ranks)
    assert "errors.py:2: causalpatch.errors (rank 0) imports causalpatch.names (rank 2)" in ranks
    assert "add causalpatch.extra to the rank table" in ranks
    assert "tracing" not in ranks and "adapters" not in ranks and "methods" not in ranks
    # a dotted key ranks a submodule apart from its package, in both directions
    assert "sae/__init__.py:2: causalpatch.sae (rank 6) imports causalpatch.sae.train (rank 18)" \
        in ranks
    assert "sae/__init__.py:1" not in ranks and "sae/train.py" not in ranks

    private = text(check_private_imports).splitlines()
    assert any(line.startswith("causalpatch/engine.py:2: causalpatch.engine imports private "
                               "'_helper' from causalpatch.plan") for line in private)
    assert sum("uses private causalpatch.plan._helper" in line for line in private) == 2
    assert "causalpatch.adapters.llama imports private '_registry' from causalpatch.adapters" \
        in "\n".join(private)  # even from its own package
    assert not any("__name__" in line for line in private)

    methods = check_methods_independent(root)
    assert [m.split(";")[0] for m in methods] == [
        "causalpatch/methods/a.py:1: causalpatch.methods.a imports causalpatch.methods.b",
        "causalpatch/methods/b.py:1: causalpatch.methods.b imports causalpatch.methods.a"]

    hf = check_hf_internals(root)
    assert hf == ["causalpatch/hooks.py:2: imports transformers.cache_utils",
                  "causalpatch/metrics.py:5: keyword argument past_key_values=",
                  "causalpatch/metrics.py:5: string 'model.layers.0.self_attn' names self_attn, "
                  "model.layers", "causalpatch/metrics.py:7: attribute .model.layers",
                  "causalpatch/metrics.py:7: attribute .lm_head"]
    assert hf_words("the model has layers; use a cache") == []
