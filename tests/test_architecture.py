"""The direction of imports between the packages (docs/ARCHITECTURE.md): no package imports one above it.

    retro_db (the DB format, read side)  <-  pipeline (the build)
    retro_db                             <-  model (RETRO)            <-  index_service (the service)

``pipeline`` and ``model`` are side by side: neither imports the other. Imports inside functions
count too (a lazy import is still a dependency).
"""

import ast
import os

from conftest import REPO

LAYERS = {"retro_db": 0, "pipeline": 1, "model": 1, "index_service": 2}


def imported_packages(source: str) -> set[str]:
    """The top-level names of every module ``source`` imports, anywhere in it (relative imports excluded)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def back_edges(package: str, source: str) -> set[str]:
    """The project packages that a module of ``package`` may not import but does."""
    return {p for p in imported_packages(source) & LAYERS.keys() if p != package and LAYERS[p] >= LAYERS[package]}


def test_the_rule_finds_a_back_edge_wherever_the_import_is():
    lazy = "def f():\n    from index_service.client import IndexClient\n"
    assert back_edges("model", lazy) == {"index_service"}
    assert back_edges("model", "import pipeline.stage as s\n") == {"pipeline"}  # side by side
    assert back_edges("index_service", "from model import checkpoint\nimport retro_db\n") == set()
    assert back_edges("retro_db", "from . import layout\nimport numpy\n") == set()


def test_no_package_imports_one_above_it():
    found = {}
    for package in LAYERS:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    edges = back_edges(package, open(path, encoding="utf-8").read())
                    if edges:
                        found[os.path.relpath(path, REPO)] = sorted(edges)
    assert found == {}
