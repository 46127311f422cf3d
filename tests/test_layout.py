"""The project's shape: which module may import which, so that the imports run one way."""
import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = {"grpo", "objectives", "engine", "vllm_sampler", "rewards", "data", "sft", "configurator", "runs",
           "distributed", "r1", "plot", "tools", "usercode", "reward_model", "lmhead"}
ALLOWED = {  # what each module may import of the project, at any depth of its code
    "configurator": set(),
    "usercode": {"configurator"},
    "reward_model": {"configurator", "runs"},
    "rewards": {"configurator", "usercode", "reward_model"},  # a reward model's rm:PATH
    "objectives": {"configurator"},
    "plot": set(),
    "distributed": {"configurator"},
    "runs": {"configurator", "distributed"},
    "vllm_sampler": {"configurator", "distributed", "runs"},
    "tools": {"configurator", "distributed", "rewards", "usercode"},
    "engine": {"configurator", "distributed", "runs", "tools", "vllm_sampler"},
    "lmhead": {"configurator", "engine"},
    "data": {"configurator", "distributed", "rewards", "tools"},
    "sft": {"configurator", "data", "distributed", "engine", "runs", "tools"},
    "grpo": {"configurator", "data", "distributed", "engine", "lmhead", "objectives", "rewards", "runs",
             "sft", "tools"},
    "r1": {"configurator", "data", "distributed", "engine", "grpo", "reward_model", "rewards", "runs", "sft"},
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
    """grpo.py at most 700 lines, of which at most 525 from its docstring to the end of train()."""
    with open(os.path.join(ROOT, "grpo.py")) as f:
        source = f.read()
    train = next(node for node in ast.parse(source).body
                 if isinstance(node, ast.FunctionDef) and node.name == "train")
    assert (len(source.splitlines()) <= 700
            and train.end_lineno <= 525), (len(source.splitlines()), train.end_lineno)


def names_from_other_modules(function):
    """The project names grpo.py's `function` uses from other modules: module.attribute, and names
    imported from a module of the project -> {(module, name)}."""
    with open(os.path.join(ROOT, "grpo.py")) as f:
        tree = ast.parse(f.read())
    modules, imported = set(), {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names if alias.name in PROJECT}
        elif isinstance(node, ast.ImportFrom) and node.module in PROJECT:
            imported.update({alias.asname or alias.name: node.module for alias in node.names})
    body = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function)
    used = set()
    for node in ast.walk(body):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            used.add((node.value.id, node.attr))
        elif isinstance(node, ast.Name) and node.id in imported:
            used.add((imported[node.id], node.id))
    return used


def test_the_loop_uses_few_names_of_other_modules_and_none_about_tools():
    """train() reads as the paper's step: what it takes from other modules stays few (data, rewards,
    collectives, the run directory's log), and tools are the sampler's business, not the loop's."""
    used = names_from_other_modules("train")
    assert len(used) <= 16, sorted(used)
    assert not [name for module, name in used if module == "tools" or "tool" in name], sorted(used)
    with open(os.path.join(ROOT, "grpo.py")) as f:
        source = f.read()
    train = next(node for node in ast.parse(source).body
                 if isinstance(node, ast.FunctionDef) and node.name == "train")
    assert "tool" not in ast.get_source_segment(source, train)


def readme_recipe(title):
    """The code block of the README's "Hack it" recipe that starts with **title** -> its lines."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    opening = readme.index("```\n", readme.index(f"**{title}")) + 4
    return readme[opening:readme.index("\n```", opening)].splitlines()


def split_at(lines, marker):
    """(the lines before the first that starts with marker, that line, the lines after it)."""
    at = next(i for i, line in enumerate(lines) if line.startswith(marker))
    return lines[:at], lines[at], lines[at + 1:]


def insert_after(path, anchor, new_lines):
    with open(path) as f:
        lines = f.read().splitlines()
    at = next(i for i, line in enumerate(lines) if anchor in line)
    with open(path, "w") as f:
        f.write("\n".join(lines[:at + 1] + new_lines + lines[at + 1:]) + "\n")


@pytest.mark.slow
def test_the_hack_it_recipes_fit_the_layout_and_run(tmp_path):
    """Both of the README's recipes for a variant, applied to a copy of the project as written there,
    keep this file's rules green and train: the core has room for them."""
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name in ("tests", "bench", "configs", "README.md"):
            copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy
            copy(os.path.join(ROOT, name), tmp_path / name)
    estimator, _, table_line = split_at(readme_recipe("An advantage estimator"), "# in grpo.py")
    variant, field, rest = split_at(readme_recipe("Any other variant"), "# in objectives.Variants:")
    _, _, train_lines = split_at(rest, "# in grpo.train")
    with open(tmp_path / "objectives.py", "a") as f:
        f.write("\n\n" + "\n".join(estimator[1:]) + "\n\n\n" + "\n".join(variant[1:]) + "\n")
    insert_after(tmp_path / "objectives.py", "tis_cap: float", ["    " + field.split(":", 1)[1].strip()])
    insert_after(tmp_path / "grpo.py", "ADVANTAGES = {", table_line)
    insert_after(tmp_path / "grpo.py", "advantages = ADVANTAGES[cfg.advantage]", train_lines)
    with open(tmp_path / "grpo.py") as f:
        source = f.read()
    with open(tmp_path / "grpo.py", "w") as f:
        f.write(re.sub(r'Literal\["grpo", "rloo", "reinforce_pp"\]',
                       'Literal["grpo", "rloo", "reinforce_pp", "median"]', source))
    layout = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(tmp_path / "tests" / "test_layout.py"), "-k", "not recipes"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert layout.returncode == 0, layout.stdout[-3000:]
    run = subprocess.run([sys.executable, "grpo.py", "--advantage=median", "--adv_clip=0.5", "--max_steps=2",
                          "--sft_steps=2", "--eval_size=0", "--prompts_per_step=2", "--group_size=3",
                          f"--out_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    check = ("import torch, grpo; a = grpo.ADVANTAGES['median'](torch.tensor([0., 1., 3.]), 3, 'none', 0.0); "
             "print(a.tolist())")
    shown = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert shown.stdout.strip() == "[-1.0, 0.0, 2.0]", shown.stderr[-2000:]  # r - median, by hand
