"""The project's shape: which module may import which, so that the imports run one way."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = {"grpo", "objectives", "engine", "vllm_sampler", "rewards", "data", "sft", "configurator", "runs",
           "distributed", "r1", "plot", "tools", "usercode"}
ALLOWED = {  # what each module may import of the project, at any depth of its code
    "configurator": set(),
    "usercode": {"configurator"},
    "rewards": {"configurator", "usercode"},
    "objectives": {"configurator"},
    "plot": set(),
    "distributed": {"configurator"},
    "runs": {"configurator", "distributed"},
    "vllm_sampler": {"configurator", "distributed", "runs"},
    "tools": {"configurator", "distributed", "rewards", "usercode"},
    "engine": {"configurator", "distributed", "runs", "tools", "vllm_sampler"},
    "data": {"configurator", "distributed", "rewards", "tools"},
    "sft": {"configurator", "data", "distributed", "engine", "runs", "tools"},
    "grpo": {"configurator", "data", "distributed", "engine", "objectives", "rewards", "runs", "sft",
             "tools"},
    "r1": {"configurator", "data", "distributed", "engine", "grpo", "rewards", "runs", "sft"},
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


def python_files():
    top = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    nested = [os.path.join(d, f) for d in ("bench", "tests", "configs")
              for f in os.listdir(os.path.join(ROOT, d)) if f.endswith(".py")]
    return sorted(top + nested)


@pytest.mark.parametrize("path", python_files())
def test_lines_are_at_most_110_columns(path):
    with open(os.path.join(ROOT, path)) as f:
        wide = [n for n, line in enumerate(f, 1) if len(line.rstrip("\n")) > 110]
    assert not wide, f"{path}: lines {wide} run past 110 columns"


@pytest.mark.parametrize("path", python_files())
def test_no_function_takes_more_than_7_parameters(path):
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    many = [node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and len(node.args.posonlyargs + node.args.args + node.args.kwonlyargs) > 7]
    assert not many, f"{path}: {many} take more than 7 parameters"


def test_grpo_py_reads_in_one_sitting():
    """grpo.py at most 500 lines, of which at most 350 from its docstring to the end of train()."""
    with open(os.path.join(ROOT, "grpo.py")) as f:
        source = f.read()
    train = next(node for node in ast.parse(source).body
                 if isinstance(node, ast.FunctionDef) and node.name == "train")
    assert (len(source.splitlines()) <= 500
            and train.end_lineno <= 350), (len(source.splitlines()), train.end_lineno)
