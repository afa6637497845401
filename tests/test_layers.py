"""The layers import only those below them (shared/STYLE.md): the model never imports the engine, the
scheduler never imports JAX, the server talks to a `Backend` and never imports the facade."""

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).parent.parent / "src" / "jaxserver"
# What each module or folder may not import (prefixes of module names).
FORBIDDEN = {
    "model": ("jaxserver.engine", "jaxserver.server", "jaxserver.jaxserver", "jaxserver.prompts"),
    "parallel": ("jaxserver.engine", "jaxserver.server", "jaxserver.jaxserver"),
    "engine": ("jaxserver.server", "jaxserver.jaxserver", "jaxserver.prompts"),
    "engine/scheduler.py": ("jax", "jaxserver.model.llama", "jaxserver.engine.runner"),
    "prompts.py": ("jax", "jaxserver.engine", "jaxserver.server", "jaxserver.jaxserver"),
    "server": ("jaxserver.jaxserver",),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer):
    root = SOURCE / layer
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    assert files
    broken = {
        f"{path.relative_to(SOURCE)} imports {name}"
        for path in files
        for name in imported_modules(path)
        for prefix in FORBIDDEN[layer]
        if name == prefix or name.startswith(prefix + ".")
    }
    assert not broken
