"""The one-way import rule of docs/architecture.md: no module imports a layer above its own."""

import ast
from pathlib import Path

import pytest

import trainer

ROOT = Path(__file__).resolve().parents[1]

# Layer of each top-level module or package; a module may import only strictly lower layers (and
# its own package). Lazy imports inside functions count too.
LAYERS = {
    "trainer.constants": 0,
    "trainer.errors": 0,
    "trainer.third_party": 0,
    "csrc_triton": 1,
    "trainer.config": 1,
    "trainer.files": 1,
    "trainer.signals": 1,
    "trainer.callbacks": 1,
    "trainer.runtime": 1,
    "trainer.ops": 2,
    "trainer.models": 3,
    "trainer.optim": 4,
    "trainer.data": 4,
    "trainer.parallel": 4,
    "trainer.lora": 4,
    "trainer.plot": 4,
    "trainer.prefetch": 4,
    "trainer.hf_patch": 4,
    "trainer.trackers": 4,
    "trainer.hf_callbacks": 4,
    "trainer.metrics": 5,
    "trainer.checkpoint": 5,
    "trainer.evaluation": 5,
    "trainer.output_dir": 6,
    "trainer.summary": 6,
    "trainer.model_card": 6,
    "trainer.plan": 6,
    "trainer.build": 7,
    "trainer.loop": 8,
    "trainer.eval_command": 8,
    "trainer.generate": 8,
    "trainer.bench": 9,
    "trainer.plan.measure": 9,  # both run whole training loops
    "trainer.cli": 10,
    "trainer": 10,
    "trainer.__main__": 11,
}


def unit_of(module: str) -> str:
    """The LAYERS key that `module` belongs to (the longest prefix)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return name
    raise KeyError(module)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> list[str]:
    found = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                if f"{module}.{alias.name}" in LAYERS:  # `from trainer import ops` imports trainer.ops
                    found.append(f"{module}.{alias.name}")
                elif module == "trainer" and alias.name in trainer._EXPORTS:  # the lazy public names
                    found.append(trainer._EXPORTS[alias.name])
                else:
                    found.append(module)
    return [m for m in found if m and m.split(".")[0] in ("trainer", "csrc_triton")]


SOURCES = sorted(p for folder in ("trainer", "csrc_triton") for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_its_own(path):
    name = module_name(path)
    own = unit_of(name)
    upward = [
        m
        for m in imports_of(path, name)
        if unit_of(m) != own
        and not (name == "trainer" and m.startswith("trainer."))
        and LAYERS[unit_of(m)] >= LAYERS[own]
    ]
    assert not upward, f"{name} (layer {LAYERS[own]}) imports {upward}"


def test_no_two_modules_import_each_other():
    """Within a layer too: a pair that imports each other (even lazily) is one module in two files."""
    imports = {module_name(path): set(imports_of(path, module_name(path))) for path in SOURCES}
    pairs = sorted(
        (a, b)
        for a, of_a in imports.items()
        for b in of_a
        if a < b and b in imports and a in imports[b] and not (a.startswith(b + ".") or b.startswith(a + "."))
    )
    assert pairs == []


def test_importing_the_ops_loads_neither_the_loop_nor_the_data_pipeline():
    import subprocess
    import sys

    code = (
        "import sys, trainer.ops; "
        "print(sorted(m for m in sys.modules if m.startswith(('trainer.loop', 'trainer.data', 'trainer.optim', "
        "'torch.distributed.fsdp'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
