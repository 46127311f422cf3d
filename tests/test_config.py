"""Config: defaults -> file -> command line; every mistake is one line, exit code 2, before any model
loads."""
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest

import configurator
import data
import grpo
import rewards as R
import runs
from conftest import ROOT, SHARED


def run_main(capsys, *args):
    code = grpo.main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def test_defaults_file_then_command_line(tmp_path):
    path = tmp_path / "c.py"
    path.write_text('"""A recipe."""\n# comment\nlr = 1e-5\ngroup_size = 4\nrewards = "accuracy"\n'
                    'bf16 = None\nadam_betas = (0.9, 0.95)\n')
    cfg = grpo.parse_config(["--config", str(path), "--lr=2e-5", "--mask_truncated=true"])
    assert ((cfg.lr, cfg.group_size, cfg.rewards, cfg.adam_betas, cfg.mask_truncated)
            == (2e-5, 4, "accuracy", (0.9, 0.95), True))
    assert cfg.beta == 0.04 and cfg.clip_eps_high == cfg.clip_eps_low == 0.2   # clip_eps_high defaults to low
    assert grpo.parse_config([f"--config={path}", "--clip_eps_high=0.28"]).clip_eps_high == 0.28
    assert grpo.parse_config(["--lr=1"]).lr == 1.0                                 # int accepted for float


@pytest.mark.parametrize("args, message", [
    (["--lrr=1e-5"], "unknown config key 'lrr' (did you mean 'lr'?)"),
    (["--lr=fast"], "lr: cannot read 'fast' as float"),
    (["--group_size=2.5"], "group_size: expected int, got 2.5"),
    (["--group_size=1"], "group_size: must be at least 2"),
    (["--clip_eps_low=-0.1"], "clip_eps_low: must not be negative"),
    (["--clip_eps_high=-0.1"], "clip_eps_high: must not be negative"),
    (["--beta=-1"], "beta: must not be negative"),
    (["--loss_type=ppo"], "loss_type: 'ppo' is not one of grpo, dapo, dr_grpo, cispo"),
    (["--scale_rewards=mean"], "scale_rewards: 'mean' is not one of group, batch, none"),
    (["--rewards=accuracy,speling"], "rewards: unknown reward 'speling'"),
    (["--task=gsm8k"], "data_path: task gsm8k needs a JSONL file"),
    (["--task=gsm8k", "--data_path=/no/such.jsonl"], "data_path: /no/such.jsonl: no such file"),
    (["--model=./no/such/dir"], "model: ./no/such/dir: no such directory"),
    (["--top_p=0"], "top_p: must be in (0, 1]"),
    (["--micro_batch_size=0"], "micro_batch_size: must be at least 1"),
    (["lr=1"], "expected --key=value, got 'lr=1'"),
    (["--config", "/no/such/config.py"], "/no/such/config.py: No such file or directory"),
    (["--resume=/no/such/run"], "resume: /no/such/run/train_config.json not found"),
])
def test_bad_values_fail_with_one_line_and_code_2(capsys, tmp_path, args, message):
    out = tmp_path / "run"
    code, err = run_main(capsys, *args, f"--out_dir={out}")
    assert code == 2 and err.startswith("grpo.py: error: " + message) and "\n" not in err
    assert not out.exists()     # stopped before anything was made or loaded


@pytest.mark.parametrize("text, message", [
    ("import os\n", ":1: only `key = value` lines are allowed"),
    ("lr = 1e-5\nlr2 = 3\n", ":2: unknown config key 'lr2' (did you mean 'lr'?)"),
    ("lr = 'fast'\n", ":1: lr: expected float, got 'fast'"),
    ("x = __import__('os').system('touch PWNED')\n", ":1: unknown config key 'x'"),
    ("lr = __import__('os').system('touch PWNED')\n", ":1: lr: not a literal"),
    ("lr = (\n", ":1: '(' was never closed"),
])
def test_config_files_are_parsed_never_executed(capsys, tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.py"
    path.write_text(text)
    code, err = run_main(capsys, "--config", str(path))
    assert code == 2 and err == f"grpo.py: error: {path}{message}"
    assert not (tmp_path / "PWNED").exists()


def test_malformed_data_file_names_file_and_line(capsys, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 3"}\n{"question": "q2"}\n')
    code, err = run_main(capsys, "--task=gsm8k", f"--data_path={path}", f"--out_dir={tmp_path / 'run'}")
    assert code == 2 and err == f"grpo.py: error: {path}:2: missing or empty string field 'answer'"


def test_command_line_error_in_a_subprocess(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), "--group_size=1"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "group_size" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as stop:
        grpo.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    for field in grpo.dataclasses.fields(grpo.Config):
        assert f"--{field.name}=" in out
    assert "{group | batch | none}" in out and "{arithmetic | products | countdown | gsm8k | jsonl}" in out


@pytest.mark.parametrize("arg, message", [
    ("--loss_type=ppo", "loss_type: 'ppo' is not one of grpo, dapo, dr_grpo, cispo"),
    ("--task=mmlu", "task: 'mmlu' is not one of arithmetic, products, countdown, gsm8k, jsonl"),
])
def test_a_choice_is_checked_where_it_is_declared(capsys, arg, message):
    code, err = run_main(capsys, arg)
    assert code == 2 and err == f"grpo.py: error: {message}"


def test_gsm8k_paths_validate(tmp_path):
    cfg = grpo.parse_config(["--task=gsm8k", f"--data_path={SHARED}/train.jsonl",
                             f"--eval_data_path={SHARED}/test.jsonl"])
    assert cfg.task == "gsm8k"


def test_readme_documents_every_flag():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    missing = [f.name for f in grpo.dataclasses.fields(grpo.Config) if f"| `{f.name}` |" not in readme]
    assert not missing
    # a field's choices are declared once, on the field, and shown
    for f in grpo.dataclasses.fields(grpo.Config):
        allowed = configurator.choices(grpo.Config, f.name)
        if allowed:
            row = readme.split(f"| `{f.name}` |")[1].split("\n")[0]
            assert " &#124; ".join(allowed) in row, f.name


SHIPPED = sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".py"))


def stand_in_datasets(monkeypatch):
    """A `datasets` module whose load_dataset("openai/gsm8k", "main", split) reads the local GSM8K
    copy (nothing may download at test time); find_spec reports it installed."""
    def load_dataset(name, config, split):
        assert (name, config) == ("openai/gsm8k", "main")
        with open(os.path.join(SHARED, f"{split}.jsonl")) as f:
            return [json.loads(line) for line in f]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "datasets" else real(name, *a))


class ModelLoad(Exception):
    pass


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_runs_as_shipped_up_to_the_model_load(name, tmp_path, monkeypatch):
    """Each file exactly as shipped (its hub dataset names included, through a stand-in `datasets`):
    parsed, validated, its data loaded and its run directory made, up to loading the model (the
    config is saved only once every check after the load has passed)."""
    stand_in_datasets(monkeypatch)
    monkeypatch.chdir(tmp_path)                       # out_dir = "runs/..." lands here

    def open_policy(path, *args):
        raise ModelLoad(path)
    monkeypatch.setattr(grpo, "open_policy", open_policy)
    cfg = grpo.parse_config(["--config", os.path.join(ROOT, "configs", name)])
    assert cfg.out_dir.startswith(str(tmp_path / "runs"))     # made absolute, where it was given
    with pytest.raises(ModelLoad) as loaded:
        grpo.train(cfg)
    expected = os.path.join(cfg.out_dir, "tiny") if cfg.model == "tiny" else cfg.model
    assert str(loaded.value) == expected and (tmp_path / cfg.out_dir).is_dir()
    assert not (tmp_path / cfg.out_dir / "train_config.json").exists()


class Decoder:
    """Stands in for a tokenizer's batch_decode: the 'ids' are the sampled texts themselves."""
    def batch_decode(self, texts, skip_special_tokens):
        return list(texts)


def perfect_answer(cfg):
    """(an example of cfg's task, its right answer as written in <answer>)."""
    if cfg.task == "countdown":
        return ({"question": "Using the numbers [3, 8, 2]...", "answer": "22", "numbers": [3, 8, 2],
                 "target": 22}, "3*8-2")
    if cfg.task == "gsm8k":
        return {"question": "Natalia sold 48 clips...", "answer": "72"}, "72"
    return data.addition_example(47, 38), "85"


@pytest.mark.parametrize("name", [None] + SHIPPED)
def test_a_perfect_completion_scores_full_marks_under_every_shipped_config(name, tmp_path, monkeypatch):
    """Under its own template and prefill (TinyZero's prefill has text before <think>), a perfect
    completion scores the maximum of every reward the config names (1; overlong's is 0), and one
    without the answer tags scores 0 on format."""
    stand_in_datasets(monkeypatch)
    cfg = grpo.parse_config(["--config", os.path.join(ROOT, "configs", name)] if name else [])
    example, answer = perfect_answer(cfg)
    whole = f"<think>I work it out step by step.</think>\n<answer>{answer}</answer>"
    opening = data.judged_prefill(cfg.prefill)   # what the prompt already wrote of the answer
    assert whole.startswith(opening)
    sampled, malformed = (whole[len(opening):],
                          f"<think>I work it out step by step.</think>\n{answer}"[len(opening):])
    texts = data.decode(Decoder(), [sampled, malformed], cfg.prefill)
    context = dict(example, completion_tokens=20, max_new_tokens=cfg.max_new_tokens,
                   overlong_buffer=cfg.overlong_buffer, language=cfg.language)
    best = {"overlong": 0.0}
    for reward, _ in R.parse_reward_spec(cfg.rewards):
        assert R.REWARDS[reward](texts[0], context) == best.get(reward, 1.0), reward
    assert R.format_reward(texts[1], context) == 0.0
    assert R.safe_reward(data.correctness(cfg.task), texts[0], context)[0] == 1.0


def test_wandb_asked_but_not_installed(capsys, monkeypatch):
    monkeypatch.setattr(runs.importlib.util, "find_spec", lambda name: None if name == "wandb" else True)
    code, err = run_main(capsys, "--wandb=True")
    assert code == 2 and err == "grpo.py: error: wandb: the wandb package is not installed"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_asked_on_a_machine_without_it(capsys, tmp_path, device):
    code, err = run_main(capsys, f"--device={device}", f"--out_dir={tmp_path / 'run'}")
    assert code == 2 and err == (f"grpo.py: error: device: {device!r}, but torch sees no CUDA device here "
                                 "(a CPU build, or no GPU); use --device=cpu")
    assert not (tmp_path / "run").exists()
