"""The project's shape: which module may import which, so that the imports run one way."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = {"grpo", "engine", "rewards", "data", "configurator", "runs", "r1", "plot"}
ALLOWED = {  # what each module may import of the project, at any depth of its code
    "configurator": set(),
    "rewards": set(),
    "plot": set(),
    "data": {"configurator"},
    "runs": {"configurator"},
    "engine": {"runs"},
    "grpo": {"configurator", "data", "engine", "rewards", "runs"},
    "r1": {"configurator", "data", "engine", "grpo", "rewards", "runs"},
}


def project_imports(name):
    with open(os.path.join(ROOT, name + ".py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_imports_run_one_way(name):
    assert project_imports(name) <= ALLOWED[name], f"{name} imports {project_imports(name) - ALLOWED[name]}"


def test_every_module_is_listed():
    modules = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert modules == PROJECT
