"""The package's layering, read from the import statements of every module (module- and function-level alike).

Layers, lowest first; a module may import modules of its own layer and of the layers below it, never above:

    base         jaxserve.config, .errors, .sampling_params, .planner
                 configuration, exception types, per-request options, the KV page budget: host-side pieces
                 every other layer uses (no model code)
    models       jaxserve.models
                 the forward pass and what it computes with: weight formats (float, bf16, int8 / int4), the paged
                 KV cache's storage
    kernels      pallas_kernels
                 Pallas kernels, bound to the models' weight and KV cache types (the models never import them)
    weights      jaxserve.weights
                 reading, converting, quantizing and saving weights (GGUF, safetensors, converted checkpoints),
                 and the tokenizer that comes with them (from tokenizer.json or the GGUF's vocabulary)
    engine       jaxserve.engine
                 requests, scheduler, block manager, runner, the step loop
    speculative  jaxserve.speculative
                 draft proposers and verification, run by the engine's runner
    parallel     jaxserve.parallel
                 meshes, partition rules, pipeline stages, multi-host start-up, the mesh engine
    llm          jaxserve.llm
                 `LLM`: load -> quantize -> engine
    front        jaxserve (the package's __init__), .server, .cli, .batch
                 entry points: the public API names, HTTP server, command line, batch jobs

Besides, no two packages (the entries above: a sub-package, or a module directly under jaxserve/) import each
other, directly or round a longer loop.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

LAYERS = (
    ("base", ("jaxserve.config", "jaxserve.errors", "jaxserve.sampling_params", "jaxserve.planner")),
    ("models", ("jaxserve.models",)),
    ("kernels", ("pallas_kernels",)),
    ("weights", ("jaxserve.weights",)),
    ("engine", ("jaxserve.engine",)),
    ("speculative", ("jaxserve.speculative",)),
    ("parallel", ("jaxserve.parallel",)),
    ("llm", ("jaxserve.llm",)),
    ("front", ("jaxserve", "jaxserve.server", "jaxserve.cli", "jaxserve.batch")),
)

# (importing module, imported module) edges that break the layering today.
KNOWN_VIOLATIONS: set = set()

_LAYER_OF = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def _modules() -> dict:
    """{module name: path} of every module under jaxserve/ and pallas_kernels/."""
    out = {}
    for top in ("jaxserve", "pallas_kernels"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _unit(module: str):
    """The LAYERS entry a module belongs to (the longest matching prefix; "jaxserve" only itself), or None."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in _LAYER_OF and (name != "jaxserve" or module == "jaxserve"):
            return name
    return None


def _imports(module: str, path: pathlib.Path) -> set:
    """The jaxserve / pallas_kernels modules `module` imports anywhere in its file (module level, in functions,
    under `if`). `from a import b` counts as importing the module a.b when there is one, else a."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module
            for a in node.names:
                found.add(f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src)
    return {m for m in found if m.split(".")[0] in ("jaxserve", "pallas_kernels")}


def _edges() -> set:
    return {(m, t) for m, p in MODULES.items() for t in _imports(m, p)}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _unit(m) is None] == []


def test_imported_modules_exist():
    """Guards the parsing above: every import it finds names a module of the tree."""
    missing = sorted((m, t) for m, t in _edges() if t not in MODULES)
    assert missing == []


def test_no_import_from_a_lower_layer_up():
    up = []
    for m, t in sorted(_edges()):
        lm, lt = _LAYER_OF[_unit(m)], _LAYER_OF[_unit(t)]
        if lt > lm and (m, t) not in KNOWN_VIOLATIONS:
            up.append(f"{m} ({LAYERS[lm][0]}) imports {t} ({LAYERS[lt][0]})")
    assert up == [], "imports from a lower layer up:\n" + "\n".join(up)


def test_known_violations_still_exist():
    """A removed edge must leave KNOWN_VIOLATIONS too, so the set never hides a new one."""
    assert sorted(KNOWN_VIOLATIONS - _edges()) == []


def test_no_cycle_between_packages():
    graph = {}
    for m, t in _edges() - KNOWN_VIOLATIONS:
        a, b = _unit(m), _unit(t)
        if a != b:
            graph.setdefault(a, set()).add(b)
    cycles = set()

    def visit(node, path):
        if node in path:
            loop = path[path.index(node):]
            i = loop.index(min(loop))
            cycles.add(tuple(loop[i:] + loop[:i]))  # one rotation per cycle
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])

    for start in sorted(graph):
        visit(start, [])
    assert not cycles, "import cycles between packages:\n" + "\n".join(" -> ".join(c + c[:1]) for c in sorted(cycles))


def test_models_import_no_higher_layer():
    """The models compute with their own weight and KV types: nothing of weights/, engine/, pallas_kernels/."""
    bad = sorted((m, t) for m, t in _edges() if _unit(m) == "jaxserve.models" and _unit(t) != "jaxserve.models"
                 and _LAYER_OF[_unit(t)] > _LAYER_OF["jaxserve.models"])
    assert bad == []
