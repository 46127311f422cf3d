"""Hostile or careless use: bad values, damaged run directories, rewards that misbehave. Each
ends in one line (exit code 2) or in a run that goes on, and never changes a run directory
before every check has passed."""
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import typing

import pytest
import torch

import data
import grpo
import rewards as R
import runs
import sft
from conftest import ROOT, SHARED, Loaded, stop_at

# a tiny run at a constant lr (so that a resumed run reproduces a longer one step for step)
ARGS = ["--sft_steps=0", "--eval_size=0", "--prompts_per_step=2", "--group_size=4", "--max_new_tokens=8",
        "--rewards=overlong:1,format:1", "--overlong_buffer=8", "--log_samples_every=1", "--warmup_steps=0",
        "--min_lr_ratio=1.0", "--save_every=1", "--keep_checkpoints=2"]
TIMINGS = {"t_sample", "t_rewards", "t_logprobs", "t_update", "tokens_per_sec"}


def main(capsys, *args):
    capsys.readouterr()                      # what ran before in the test is not this run's
    code = grpo.main(list(args))
    return code, capsys.readouterr().err.strip()


def cli(*args, cwd=None):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), *args], capture_output=True,
                            text=True, timeout=300, cwd=cwd)
    return result.returncode, result.stderr.strip()


def rows(run, name="metrics.jsonl"):
    with open(os.path.join(run, name)) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in f]


def snapshot(run):
    """Every file's bytes and every directory of a run: what must not change."""
    found = {}
    for folder, dirs, files in os.walk(run):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), run) + "/"] = None
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.relpath(os.path.join(folder, name), run)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def runs_made(tmp_path_factory):
    """A finished 2-step run (checkpoints 1 and 2) and an uninterrupted 3-step one to compare with."""
    root = tmp_path_factory.mktemp("made")
    grpo.train(grpo.parse_config(ARGS + ["--max_steps=2", f"--out_dir={root / 'two'}"]))
    grpo.train(grpo.parse_config(ARGS + ["--max_steps=3", f"--out_dir={root / 'three'}"]))
    return root


@pytest.fixture
def run(runs_made, tmp_path):
    shutil.copytree(runs_made / "two", tmp_path / "run")
    return tmp_path / "run"


def one_line_refusal(code, err, start):
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith("grpo.py: error: " + start), err


# ----------------------------------------------------------------------------
# 1, 11. a resume refused for any reason leaves the run as it was; what it cannot honour is refused


@pytest.mark.parametrize("args, start", [
    (["--max_new_tokens=100000"], "max_new_tokens: 100000 leaves no room for a prompt"),
    (["--lora_rank=8"], "lora_rank: the run was trained with lora_rank=0; its checkpoint cannot continue "
                        "with 8"),
    (["--model=/tmp"], "model: the run was trained with model='tiny'"),
    (["--seed=1"], "seed: the run was trained with seed=0"),
    (["--sft_steps=5"], "sft_steps: the run was trained with sft_steps=0"),
    (["--out_dir=elsewhere"], "out_dir: a resumed run continues in its own directory"),
    (["--eval_only=True"], "eval_only: evaluate a run with --model=RUN_DIR"),
    (["--lr=1e999"], "lr: inf is not a finite number"),
])
def test_a_refused_resume_changes_nothing_and_a_plain_one_still_works(capsys, run, runs_made, args, start):
    before = snapshot(run)
    one_line_refusal(*main(capsys, f"--resume={run}", *args), start)
    assert snapshot(run) == before
    assert main(capsys, f"--resume={run}", "--max_steps=3")[0] == 0
    assert rows(run) == rows(runs_made / "three")


def test_a_config_file_with_resume_is_refused(capsys, run, tmp_path):
    path = tmp_path / "c.py"
    path.write_text("lr = 1e-5\n")
    one_line_refusal(*main(capsys, f"--resume={run}", f"--config={path}"),
                     "config: a resumed run keeps its saved config")


def test_a_resume_at_another_lr_uses_it(capsys, run):
    assert main(capsys, f"--resume={run}", "--max_steps=3", "--lr=1e-5")[0] == 0
    assert [r["lr"] for r in rows(run)] == [3e-4, 3e-4, 1e-5]


@pytest.mark.skipif(not runs.installed("peft"), reason="LoRA needs peft")
@pytest.mark.parametrize("change, start", [
    ("--lora_rank=8", "lora_rank: the run was trained with lora_rank=4; its checkpoint cannot continue "
                      "with 8"),
    ("--lora_rank=0", "lora_rank: the run was trained with lora_rank=4; its checkpoint cannot continue "
                      "with 0"),
    ("--lora_alpha=8", "lora_alpha: the run was trained with lora_alpha=32.0"),
    ("--lora_target_modules=q_proj",
     "lora_target_modules: the run was trained with lora_target_modules='all-linear'"),
])
def test_lora_settings_cannot_change_on_resume(capsys, tmp_path, change, start):
    run = tmp_path / "lora"
    grpo.train(grpo.parse_config(ARGS + ["--max_steps=1", "--lora_rank=4", f"--out_dir={run}"]))
    before = snapshot(run)
    one_line_refusal(*main(capsys, f"--resume={run}", change), start)
    assert snapshot(run) == before


# ----------------------------------------------------------------------------
# 2, 14. every float finite, every int in range, the seed in [0, 2^32)

FLOATS = [f.name for f in dataclasses.fields(grpo.Config)
          if float in (f.type, *typing.get_args(f.type))]


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("value", ["1e999", "-1e999"])
def test_no_float_may_be_infinite(capsys, tmp_path, key, value):
    out = tmp_path / "run"
    one_line_refusal(*main(capsys, f"--{key}={value}", f"--out_dir={out}"),
                     f"{key}: {float(value)} is not a finite number")
    path = tmp_path / "c.py"
    path.write_text(f"{key} = {value}\n")
    one_line_refusal(*main(capsys, f"--config={path}", f"--out_dir={out}"),
                     f"{path}:1: {key}: {float(value)} is not")
    assert not out.exists()


def test_no_nan_in_a_saved_config_or_a_tuple(capsys, run, tmp_path):
    path = tmp_path / "c.py"
    path.write_text("adam_betas = (0.9, 1e999)\n")
    one_line_refusal(*main(capsys, f"--config={path}"),
                     f"{path}:1: adam_betas: (0.9, inf) is not a finite number")
    saved = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps(dict(saved, beta=float("nan"))))
    one_line_refusal(*main(capsys, f"--resume={run}"),
                     f"{run}/train_config.json: beta: nan is not a finite number")


@pytest.mark.parametrize("args, start", [
    (["--seed=-1"], "seed: -1 is not in [0, 2^32 - 1]"),
    ([f"--seed={2**64}"], f"seed: {2**64} does not fit in 64 bits"),
    ([f"--seed={2**32}"], f"seed: {2**32} is not in [0, 2^32 - 1]"),
    ([f"--max_steps={10**30}"], f"max_steps: {10**30} does not fit in 64 bits"),
])
def test_integers_out_of_range_stop_before_anything(capsys, tmp_path, args, start):
    one_line_refusal(*main(capsys, *args, f"--out_dir={tmp_path / 'run'}"), start)
    assert not (tmp_path / "run").exists()


def test_the_largest_seed_runs(tmp_path):
    grpo.train(grpo.parse_config(ARGS + ["--max_steps=1", f"--seed={2**32 - 1}", f"--out_dir={tmp_path}"]))


# ----------------------------------------------------------------------------
# 3, 4. a run stopped before its first checkpoint


class Killed(BaseException):
    """Stands in for SIGKILL: nothing of the run's own code runs after it."""


def test_a_fresh_start_after_a_kill_before_any_checkpoint_logs_each_step_once(tmp_path, monkeypatch):
    args = ARGS + ["--max_steps=3", "--save_every=100", f"--out_dir={tmp_path}"]

    def kill(*a, **k):
        raise Killed
    with monkeypatch.context() as patch:
        patch.setattr(runs, "save_training", kill)
        with pytest.raises(Killed):
            grpo.train(grpo.parse_config(args))
    assert [r["step"] for r in rows(tmp_path, "samples.jsonl")] == [1, 1, 2, 2, 3, 3]   # 2 questions a step
    grpo.train(grpo.parse_config(args))
    assert [r["step"] for r in rows(tmp_path, "samples.jsonl")] == [1, 1, 2, 2, 3, 3]
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3]


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(capsys, tmp_path, monkeypatch):
    args = ARGS + ["--sft_steps=2", "--max_steps=2", f"--out_dir={tmp_path}"]

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(sft, "sft", interrupt)
        code, err = main(capsys, *args)
    assert code == 130 and err.endswith("nothing was saved to resume; run the same command again to start "
                                        "over")
    assert "--resume" not in err
    assert main(capsys, *args)[0] == 0                        # which works


def test_ctrl_c_after_a_checkpoint_says_how_to_resume(capsys, tmp_path, monkeypatch):
    args = ARGS + ["--eval_size=4", "--max_steps=2", f"--out_dir={tmp_path}"]
    real, calls = data.evaluate, []

    def interrupt_the_last(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    with monkeypatch.context() as patch:
        patch.setattr(data, "evaluate", interrupt_the_last)
        code, err = main(capsys, *args)
    assert code == 130 and err.endswith(f"interrupted; continue with --resume={tmp_path} from its latest "
                                        "checkpoint")
    assert main(capsys, f"--resume={tmp_path}")[0] == 0
    assert json.loads((tmp_path / "summary.json").read_text())["accuracy_after"] is not None


# ----------------------------------------------------------------------------
# 5-8. rewards of your own


def reward_file(tmp_path, body, name="mine.py"):
    path = tmp_path / name
    path.write_text(body)
    return path


@pytest.mark.parametrize("value", ["1e300", "-1e300", "10**400", "1e7", "float('inf')", "'1.0'", "None",
                                   "[1.0]", "complex(1, 0)"])
def test_a_reward_that_returns_no_usable_number_scores_zero_and_is_counted(tmp_path, value):
    path = reward_file(tmp_path, f"def r(completion, example):\n    return {value}\n")
    args = ARGS + ["--max_steps=2", f"--rewards=format:1,{path}:r:1", f"--out_dir={tmp_path / 'run'}"]
    grpo.train(grpo.parse_config(args))
    logged = rows(tmp_path / "run")
    assert [r["reward_errors"] for r in logged] == [8, 8] and all(r[f"reward_{path}:r"] == 0 for r in logged)


def test_real_numbers_of_any_kind_are_rewards():
    import fractions
    import numpy as np
    for value, expected in [(True, 1.0), (3, 3.0), (fractions.Fraction(1, 2), 0.5), (np.float32(0.25), 0.25),
                            (-1e6, -1e6)]:
        assert R.safe_reward(lambda c, e: value, "x", {}) == (expected, False)


@pytest.mark.slow
def test_a_reward_file_that_exits_at_import_is_refused(tmp_path):
    for body, why in [("import sys\nsys.exit(0)\n", "it exits at import (SystemExit: 0)"),
                      ("raise SystemExit(3)\n", "it exits at import (SystemExit: 3)")]:
        path = reward_file(tmp_path, body)
        code, err = cli(f"--rewards={path}:r", f"--out_dir={tmp_path / 'run'}")
        assert (code, err) == (2, f"grpo.py: error: rewards: cannot load {path}: {why}")
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_reward_that_raises_system_exit_is_a_failed_call(tmp_path):
    path = reward_file(tmp_path, "import sys\ndef r(completion, example):\n    sys.exit(3)\n")
    code, err = cli(*ARGS, "--max_steps=2", f"--rewards=format:1,{path}:r", f"--out_dir={tmp_path / 'run'}")
    assert code == 0, err
    assert [r["reward_errors"] for r in rows(tmp_path / "run")] == [8, 8]
    assert (tmp_path / "run" / "latest").read_text() == "checkpoint-000002"


def test_a_reward_that_raises_keyboard_interrupt_stops_the_run_as_sigint_does(capsys, tmp_path):
    path = reward_file(tmp_path, "def r(completion, example):\n    raise KeyboardInterrupt\n")
    code, err = main(capsys, *ARGS, "--max_steps=5", "--save_every=100", f"--rewards=format:1,{path}:r",
                     f"--out_dir={tmp_path / 'run'}")
    assert code == 130 and err.splitlines()[-1].startswith("grpo.py: stopped by SIGINT after step 1, "
                                                           "checkpoint saved")
    assert (tmp_path / "run" / "latest").read_text() == "checkpoint-000001"


@pytest.mark.parametrize("body, takes", [
    ("def r(completion):\n    return 1.0\n", "(completion)"),
    ("def r(completion, example, extra):\n    return 1.0\n", "(completion, example, extra)"),
    ("def r():\n    return 1.0\n", "()"),
    ("r = lambda *, completion, example: 1.0\n", "(*, completion, example)"),
])
def test_a_reward_with_the_wrong_signature_is_refused_before_anything_loads(capsys, tmp_path, body, takes):
    path = reward_file(tmp_path, body)
    one_line_refusal(*main(capsys, f"--rewards={path}:r", f"--out_dir={tmp_path / 'run'}"),
                     f"rewards: {path}:r must take (completion, example); it takes {takes}")
    assert not (tmp_path / "run").exists()


def test_signatures_that_can_take_two_arguments_are_accepted(tmp_path):
    path = reward_file(tmp_path, "def a(completion, example, extra=0):\n    return 1.0\n"
                                 "def b(*args):\n    return 1.0\nclass C:\n    def __call__(self, c, e):\n"
                                 "        return 1.0\nc = C()\n")
    assert ([n for n, _ in R.parse_reward_spec(f"{path}:a,{path}:b,{path}:c")]
            == [f"{path}:{n}" for n in "abc"])


def test_a_reward_cannot_change_the_dataset(tmp_path):
    """Each call gets its own copy of the example: a reward that appends to a field of it sees
    the field as the data file has it on every call."""
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps({"prompt": f"{i}+1", "answer": i + 1, "seen": []}) + "\n"
                                 for i in range(8)))
    path = reward_file(tmp_path, "def r(completion, example):\n    example['seen'].append(1)\n"
                                 "    return float(len(example['seen']) == 1)\n")
    grpo.train(grpo.parse_config(ARGS + ["--max_steps=3", "--task=jsonl", f"--data_path={rows_file}",
                                         "--eval_size=2", f"--rewards={path}:r",
                                         f"--out_dir={tmp_path / 'run'}"]))
    assert [r[f"reward_{path}:r"] for r in rows(tmp_path / "run")] == [1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------
# 9. damaged run directories: one line, or the newest intact checkpoint, said in one line


def damage(run, how):
    latest = run / "checkpoint-000002"
    if how == "trainer_state.pt deleted":
        (latest / "trainer_state.pt").unlink()
    elif how == "trainer_state.pt truncated":
        raw = (latest / "trainer_state.pt").read_bytes()
        (latest / "trainer_state.pt").write_bytes(raw[:len(raw) // 2])
    elif how == "weights truncated":
        raw = (latest / "model.safetensors").read_bytes()
        (latest / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    elif how == "checkpoint gone":
        shutil.rmtree(latest)
    elif how == "latest empty":
        (run / "latest").write_text("")
    elif how == "latest outside the run":
        (run / "latest").write_text("../elsewhere/checkpoint-000002")
    elif how == "latest absolute":
        (run / "latest").write_text(str(run / "checkpoint-000001"))
    elif how == "latest gone":
        (run / "latest").unlink()


@pytest.mark.parametrize("how, resumed_from, note", [
    ("trainer_state.pt deleted", 1, "checkpoint-000002, the latest checkpoint, has no trainer_state.pt"),
    ("trainer_state.pt truncated", 1,
     "checkpoint-000002, the latest checkpoint, has a damaged trainer_state.pt"),
    ("weights truncated", 1, "checkpoint-000002, the latest checkpoint, has a damaged model"),
    ("checkpoint gone", 1, "checkpoint-000002, the latest checkpoint, is missing"),
    ("latest empty", 2, "latest names '', no checkpoint of this run"),
    ("latest outside the run", 2, "latest names '../elsewhere/checkpoint-000002', no checkpoint of this run"),
    ("latest absolute", 2, "no checkpoint of this run"),
    ("latest gone", 2, "latest is missing"),
])
def test_a_damaged_latest_checkpoint_resumes_from_the_newest_intact_one(capsys, run, runs_made, how,
                                                                       resumed_from, note):
    damage(run, how)
    code, err = main(capsys, f"--resume={run}", "--max_steps=3")
    assert code == 0
    notes = [line for line in err.splitlines() if line.startswith("resume:")]
    assert len(notes) == 1 and note in notes[0], err
    assert notes[0].endswith(f"resuming from checkpoint-{resumed_from:06d}, the newest intact one")
    assert rows(run) == rows(runs_made / "three")
    assert (run / "latest").read_text() == "checkpoint-000003"
    assert (run / "checkpoint-000002.damaged").is_dir() == (resumed_from == 1 and how != "checkpoint gone")


@pytest.mark.parametrize("how", ["trainer_state.pt deleted", "checkpoint gone", "latest outside the run"])
def test_no_intact_checkpoint_is_one_line_and_changes_nothing(capsys, run, how):
    shutil.rmtree(run / "checkpoint-000001")
    if how == "latest outside the run":
        shutil.rmtree(run / "checkpoint-000002")
    damage(run, how)
    before = snapshot(run)
    code, err = main(capsys, f"--resume={run}")
    one_line_refusal(code, err, "resume: ")
    assert err.endswith(f"and {run} holds no other intact checkpoint; start anew in another out_dir")
    assert snapshot(run) == before


def test_a_moved_run_directory_resumes(capsys, runs_made, tmp_path):
    grpo.train(grpo.parse_config(ARGS + ["--max_steps=2", f"--out_dir={tmp_path / 'first'}"]))
    os.rename(tmp_path / "first", tmp_path / "moved")      # its tiny/ moves with it
    assert main(capsys, f"--resume={tmp_path / 'moved'}", "--max_steps=3")[0] == 0
    assert rows(tmp_path / "moved") == rows(runs_made / "three")


def test_no_checkpoint_at_all(capsys, tmp_path):
    (tmp_path / "train_config.json").write_text(json.dumps(dataclasses.asdict(grpo.parse_config([]))))
    one_line_refusal(*main(capsys, f"--resume={tmp_path}"),
                     f"resume: {tmp_path} holds no checkpoint to resume from")


@pytest.mark.parametrize("how, text, problem", [
    ("corrupt", b"{not json", "is not valid JSON (Expecting property name enclosed in double quotes)"),
    ("truncated", None, "is not valid JSON"),
    ("empty", b"", "is not valid JSON (Expecting value)"),
    ("a list", b"[1, 2]", "holds no JSON object"),
    ("not UTF-8", b'{"lr": "\xff"}', "is not UTF-8 text"),
])
def test_a_damaged_train_config_resumes_with_the_checkpoints_copy(capsys, run, runs_made, how, text, problem):
    path = run / "train_config.json"
    path.write_bytes(path.read_bytes()[:40] if text is None else text)
    code, err = main(capsys, f"--resume={run}", "--max_steps=3")
    assert code == 0
    assert f"resume: {path} {problem}" in err and "using the config saved in checkpoint-000002" in err
    assert rows(run) == rows(runs_made / "three")
    assert json.loads(path.read_text())["max_steps"] == 3           # written anew


def test_a_damaged_train_config_without_checkpoints_is_one_line(capsys, tmp_path):
    (tmp_path / "train_config.json").write_text("{")
    one_line_refusal(*main(capsys, f"--resume={tmp_path}"),
                     f"resume: {tmp_path}/train_config.json is not valid JSON")


def test_an_unknown_key_in_train_config_names_the_file(capsys, run):
    path = run / "train_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), lrr=1)))
    before = snapshot(run)
    one_line_refusal(*main(capsys, f"--resume={run}"),
                     f"{path}: unknown config key 'lrr' (did you mean 'lr'?)")
    assert snapshot(run) == before


# ----------------------------------------------------------------------------
# 10. out_dir that cannot hold a run


def test_out_dir_that_is_a_file_or_under_one(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    for out, why in [(tmp_path / "file", f"{tmp_path / 'file'} is not a directory"),
                     (tmp_path / "file" / "run", f"{tmp_path / 'file'} is not a directory"),
                     ("/dev/null", "/dev/null is not a directory")]:
        one_line_refusal(*main(capsys, f"--out_dir={out}"), f"out_dir: {out}: {why}")


@pytest.mark.skipif(os.geteuid() != 0 and not shutil.which("setpriv"),
                    reason="root writes anywhere: needs setpriv")
def test_out_dir_that_is_read_only():
    import tempfile
    top = tempfile.mkdtemp()                 # outside pytest's own folders, which only their owner may enter
    try:
        folder = os.path.join(top, "ro")
        os.mkdir(folder)
        os.chmod(top, 0o755)
        os.chmod(folder, 0o555)
        as_nobody = (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0
                     else [])
        result = subprocess.run([*as_nobody, sys.executable, os.path.join(ROOT, "grpo.py"),
                                 f"--out_dir={folder}/run"], capture_output=True, text=True, timeout=300,
                                cwd="/")
        assert result.returncode == 2
        assert result.stderr.strip() == f"grpo.py: error: out_dir: {folder}/run: {folder} is not writable"
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(top)


# ----------------------------------------------------------------------------
# 12, 13. input files: bytes, nesting, answers, duplicate keys


def test_a_config_file_that_is_not_utf8_or_sets_a_key_twice(capsys, tmp_path):
    path = tmp_path / "c.py"
    path.write_bytes(b"lr = 1e-5\nprefill = '\xff'\n")
    one_line_refusal(*main(capsys, f"--config={path}"), f"{path}:2: not UTF-8 text")
    path.write_text("lr = 1e-5\ngroup_size = 4\nlr = 2e-5\n")
    one_line_refusal(*main(capsys, f"--config={path}"), f"{path}:3: lr is set twice (lines 1 and 3)")
    for deep, why in [("[" * 250 + "]" * 250, "1: too many nested parentheses"),
                      ("-" * 5000 + "1", " nested too deeply"), ("-" * 100_000 + "1", " nested too deeply")]:
        path.write_text(f"lr = {deep}\n")
        one_line_refusal(*main(capsys, f"--config={path}"), f"{path}:{why}")


@pytest.mark.parametrize("line, problem", [
    (b'{"prompt": "1+1", "answer": "\xff"}', "not UTF-8 text"),
    (b'{"prompt": "1+1", "answer": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"prompt": "1+1", "answer": null}',
     "'answer' must be a non-empty string or a finite number, not null"),
    (b'{"prompt": "1+1", "answer": NaN}', "'answer' must be a non-empty string or a finite number, not NaN"),
    (b'{"prompt": "1+1", "answer": {"value": 2}}', "'answer' must be a non-empty string or a finite number"),
    (b'{"prompt": "1+1", "answer": [2]}', "'answer' must be a non-empty string or a finite number"),
    (b'{"prompt": "1+1", "answer": true}',
     "'answer' must be a non-empty string or a finite number, not true"),
    (b'{"prompt": "1+1", "answer": " "}', "'answer' must be a non-empty string or a finite number"),
    (b'{"prompt": "1+1", "answer": 2, "answer": 3}', "key 'answer' appears twice"),
])
def test_a_bad_jsonl_row_names_its_file_and_line(capsys, tmp_path, line, problem):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"prompt": "2+2", "answer": 4}\n\n' + line + b"\n")
    one_line_refusal(*main(capsys, "--task=jsonl", f"--data_path={path}", f"--out_dir={tmp_path / 'run'}"),
                     f"{path}:3: {problem}")


def test_good_jsonl_answers_are_read_as_text(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('\ufeff{"prompt": "a", "answer": 4}\n{"prompt": "b", "answer": 0.5}\n'
                    '{"prompt": "c", "answer": "1,2"}\n')
    assert [e["answer"] for e in data.load_file(str(path), data.jsonl_example)] == ["4", "0.5", "1,2"]


# ----------------------------------------------------------------------------
# 15. eval_size caps a held-out file too


def test_eval_size_caps_the_held_out_file(capsys, monkeypatch, tmp_path):
    train, test = data.load_task("gsm8k", 0, f"{SHARED}/train.jsonl", f"{SHARED}/test.jsonl", eval_size=5)
    assert (len(train) == 7473
            and [e["source"] for e in test] == [f"{SHARED}/test.jsonl:{i}" for i in range(1, 6)])
    stop_at(monkeypatch, data, "initial_model")
    with pytest.raises(Loaded):
        grpo.train(grpo.parse_config(["--task=gsm8k", f"--data_path={SHARED}/train.jsonl",
                                      f"--out_dir={tmp_path}", f"--eval_data_path={SHARED}/test.jsonl",
                                      "--eval_size=500"]))
    assert "data: 7473 training questions, 500 held out" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# 16. rewards timed as their own phase; plain numbers judged cheaply


def test_rewards_are_timed_apart_from_the_log_probs(tmp_path, monkeypatch):
    now = [0.0]
    real_score = grpo.score

    def slow_score(*args):
        now[0] += 100.0                       # scoring "takes" 100 s on a clock that only it moves
        return real_score(*args)
    monkeypatch.setattr(runs, "clock", lambda device: now[0])
    monkeypatch.setattr(grpo, "score", slow_score)
    grpo.train(grpo.parse_config(ARGS + ["--max_steps=2", f"--out_dir={tmp_path}"]))
    with open(tmp_path / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert all((r["t_sample"], r["t_rewards"], r["t_logprobs"], r["t_update"]) == (0.0, 100.0, 0.0, 0.0)
               for r in logged)


def test_plain_numbers_are_judged_without_math_verify(monkeypatch):
    def refuse(*args):
        raise AssertionError("math-verify was asked")
    monkeypatch.setattr(R, "math_verify_match", refuse)
    monkeypatch.setattr(R, "math_verify_installed", lambda: True)
    R.answers_match.cache_clear()
    for truth, answer, right in [("85", "85", True), ("1234", "1,234", True), ("-3", "-3.0", True),
                                 ("18", "17", False), ("0.5", ".5", True)]:
        if R.PLAIN.fullmatch(answer):
            assert R.answers_match(truth, answer) == right
    R.answers_match.cache_clear()
    with pytest.raises(AssertionError):          # anything else still goes to math-verify
        R.answers_match("1/2", "\\frac{1}{2}")
    R.answers_match.cache_clear()


def test_a_deeply_nested_config_value_is_refused_the_same_at_any_recursion_limit(capsys, tmp_path):
    """torch's compiler raises Python's recursion limit; the answer must not depend on it."""
    import sys
    path = tmp_path / "c.py"
    path.write_text("lr = " + "-" * 3000 + "1\n")
    limit = sys.getrecursionlimit()
    try:
        for allowed in (1000, 20000):
            sys.setrecursionlimit(allowed)
            one_line_refusal(*main(capsys, f"--config={path}"), f"{path}: nested too deeply")
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("flags, installed, why", [
    (["--decoder=vllm"], False,
     "decoder: vllm needs the vllm package (pip install -r requirements-vllm.txt)"),
    (["--decoder=vllm", "--sharding=fsdp"], True,
     "decoder: vllm samples a whole copy of the policy on each rank: not with sharding=fsdp"),
    (["--decoder=vllm", "--vllm_gpu_memory_utilization=1.5"], True,
     "vllm_gpu_memory_utilization: must be in (0, 1]")])
def test_what_vllm_cannot_do_is_refused_before_any_model_loads(capsys, monkeypatch, tmp_path, flags,
                                                               installed, why):
    real = runs.installed
    monkeypatch.setattr(runs, "installed", lambda name: installed if name == "vllm" else real(name))
    code, err = main(capsys, *flags, f"--out_dir={tmp_path / 'run'}")
    assert (code, err) == (2, f"grpo.py: error: {why}")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------
# what a resumed run refuses changes nothing, whatever the class of refusal (with the cases above)

FOREIGN = "import builtins\nexec = builtins.exec\nfrom os import system\n"


@pytest.mark.parametrize("args, start", [
    (["--tools=,"], "tools: ',' names no tool"),
    (["--tool_timeout=1e12"], "tool_timeout: must be positive and at most 3600 seconds"),
    (["--template=chat"], "template: chat cannot render a prompt with this tokenizer"),
    (["--tool_tags=('<eos>', '</tool>', '<result>', '</result>')"], "tool_tags: <eos> is a special token"),
    (["--tool_tags=('<think>', '</think>', '<result>', '</result>')"],
     "tool_tags: <think>, </think> is a tag"),
    (["--prefill=<think><tool>"], "prefill: holds a tool tag"),
    (["--temperature=1e-50"], "temperature: 1e-50 is below 0.001"),
    (["--data_path=rows.jsonl"], "data_path: 'rows.jsonl' would be ignored: task=arithmetic reads no file"),
    (["--rewards=format:1,builtins:exec"], "rewards: builtins:exec is Python's own"),
    (["--tools=os:system"], "tools: os:system is Python's own"),
    (["--prefill=\udcff"], "prefill: '\\udcff' is not valid Unicode text"),
])
def test_a_resume_refused_for_any_new_reason_changes_nothing(capsys, run, runs_made, args, start):
    before = snapshot(run)
    one_line_refusal(*main(capsys, f"--resume={run}", *args), start)
    assert snapshot(run) == before
    assert main(capsys, f"--resume={run}", "--max_steps=3")[0] == 0
    assert rows(run) == rows(runs_made / "three")


# ----------------------------------------------------------------------------
# a named callable never runs model text: Python's own callables are refused, however named


@pytest.mark.parametrize("spec, problem", [
    ("--rewards=accuracy:1,builtins:exec:1",
     "rewards: builtins:exec is Python's own, not a function of yours"),
    ("--rewards=os:system", "rewards: os:system is Python's own"),
    ("--rewards=subprocess:getoutput:1", "rewards: subprocess:getoutput is Python's own"),
    ("--tools=builtins:eval", "tools: builtins:eval is Python's own"),
    ("--tools=calculator,os.path:join", "tools: os.path:join is Python's own"),
    ("FILE:exec", "rewards: {file}:exec is Python's own (builtins.exec)"),
    ("FILE:system", "rewards: {file}:system is Python's own (posix.system)"),
    ("STDLIB", "tools: {stdlib} is a file of Python's standard library, not a file of yours"),
])
def test_python_own_callables_are_refused_as_rewards_and_tools(capsys, tmp_path, spec, problem):
    import sysconfig
    file, stdlib = tmp_path / "mine.py", os.path.join(sysconfig.get_paths()["stdlib"], "subprocess.py")
    file.write_text(FOREIGN)
    spec = {"FILE:exec": f"--rewards=format:1,{file}:exec", "FILE:system": f"--rewards={file}:system",
            "STDLIB": f"--tools={stdlib}:getoutput"}.get(spec, spec)
    one_line_refusal(*main(capsys, spec, f"--out_dir={tmp_path / 'run'}"),
                     problem.format(file=file, stdlib=stdlib))
    assert not (tmp_path / "run").exists()


def test_a_config_file_cannot_name_a_shell_as_a_tool(capsys, tmp_path):
    path = tmp_path / "c.py"
    path.write_text('tools = "os:system"\n')
    one_line_refusal(*main(capsys, f"--config={path}", f"--out_dir={tmp_path / 'run'}"),
                     "tools: os:system is Python's own")


def test_a_function_of_yours_that_wraps_nothing_of_python_loads(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("import functools\ndef r(completion, example, scale=1):\n    return scale * 1.0\n"
                    "half = functools.partial(r, scale=0.5)\n")
    assert [n for n, _ in R.parse_reward_spec(f"{path}:r,{path}:half")] == [f"{path}:r", f"{path}:half"]


# ----------------------------------------------------------------------------
# an option the resolved config would not read is refused, not ignored


@pytest.mark.parametrize("args, start", [
    (["--data_path=ROWS"], "data_path: 'ROWS' would be ignored: task=arithmetic reads no file (task=jsonl or "
                           "gsm8k does)"),
    (["--task=countdown", "--eval_data_path=ROWS"],
     "eval_data_path: 'ROWS' would be ignored: task=countdown"),
    (["--task=jsonl", "--data_path=ROWS", "--digits=3"],
     "digits: 3 would be ignored: task=jsonl has no operands"),
    (["--system_prompt=Be brief."],
     "system_prompt: 'Be brief.' would be ignored: template=plain has no system"),
    (["--sft_steps=0", "--sft_lr=1e-4"], "sft_lr: 0.0001 would be ignored: no cold start runs (sft_steps=0)"),
    (["--beta=0", "--ref_sync_every=10"], "ref_sync_every: 10 would be ignored: beta=0 loads no reference"),
    (["--ref_sync_alpha=0.5"], "ref_sync_alpha: 0.5 would be ignored: the reference never moves"),
    (["--scale_rewards=none", "--adv_eps=0.1"], "adv_eps: 0.1 would be ignored: scale_rewards=none"),
    (["--advantage=reinforce_pp", "--scale_rewards=batch"], "scale_rewards: 'batch' would be ignored"),
    (["--cispo_cap=2"], "cispo_cap: 2.0 would be ignored: surrogate=clip is not cispo"),
    (["--loss_type=cispo", "--clip_eps_low=0.1"], "clip_eps_low: 0.1 would be ignored: surrogate=cispo"),
    (["--surrogate=cispo", "--clip_eps_low=0.1"], "clip_eps_low: 0.1 would be ignored: surrogate=cispo"),
    (["--eval_size=0", "--eval_every=5"], "eval_every: 5 would be ignored: no evaluation runs (eval_size=0)"),
    (["--lora_alpha=8"], "lora_alpha: 8.0 would be ignored: LoRA is off (lora_rank=0)"),
    (["--decoder=hf", "--compile_decode=True"], "compile_decode: True would be ignored: decoder=hf"),
    (["--vllm_sleep=True"], "vllm_sleep: True would be ignored: decoder=auto is not vllm"),
    (["--max_tool_calls=2"], "max_tool_calls: 2 would be ignored: no tool is given"),
    (["--tools=calculator", "--tool_timeout=9"], "tool_timeout: 9.0 would be ignored: no tool of yours"),
    (["--overlong_buffer=4"], "overlong_buffer: 4 would be ignored: no reward reads it"),
    (["--sharding=fsdp"], "sharding: 'fsdp' would be ignored: one process has nothing to share it with"),
])
def test_an_option_that_would_be_ignored_is_refused(capsys, tmp_path, args, start):
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps({"prompt": f"{i}+1", "answer": i + 1}) + "\n" for i in range(8)))
    args = [a.replace("ROWS", str(rows_file)) for a in args]
    start = start.replace("ROWS", str(rows_file))
    one_line_refusal(*main(capsys, *args, f"--out_dir={tmp_path / 'run'}"), start)
    assert not (tmp_path / "run").exists()
    path = tmp_path / "c.py"                        # from a config file too
    path.write_text("".join(f"{a[2:].split('=')[0]} = {value(a)!r}\n" for a in args))
    one_line_refusal(*main(capsys, f"--config={path}", f"--out_dir={tmp_path / 'run'}"), start)


def value(arg):
    key, _, text = arg[2:].partition("=")
    try:
        return json.loads(text.lower() if text in ("True", "False") else text)
    except ValueError:
        return text


def test_values_equal_to_the_defaults_and_the_shipped_configs_pass():
    grpo.parse_config(["--data_path=", "--lora_alpha=32", "--ref_sync_alpha=1.0", "--tool_timeout=5"])
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py") and "qwen" not in name:
            grpo.parse_config(["--config", os.path.join(ROOT, "configs", name)])
    grpo.parse_config(["--config", os.path.join(ROOT, "configs", "calculator_demo.py"), "--tools="])


# ----------------------------------------------------------------------------
# text that no tokenizer can take stops where it enters


@pytest.mark.parametrize("row", [
    '{"prompt": "1+\\ud800", "answer": 2}',
    '{"prompt": "1+1", "answer": "\\udfff"}',
    '{"prompt": "1+1", "answer": 2, "notes": ["ok", {"k": "\\ud83d"}]}',
])
def test_a_jsonl_row_with_a_lone_surrogate_names_its_line(capsys, tmp_path, row):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "2+2", "answer": 4}\n' + row + "\n")
    code, err = main(capsys, "--task=jsonl", f"--data_path={path}", f"--out_dir={tmp_path / 'run'}")
    one_line_refusal(code, err, f"{path}:2: ")
    assert err.endswith("is not valid Unicode text (a lone surrogate)")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_config_values_that_are_not_unicode_are_refused(tmp_path):
    path = tmp_path / "c.py"
    path.write_text('system_prompt = "\\ud800"\n')
    code, err = cli(f"--config={path}", f"--out_dir={tmp_path / 'run'}")
    assert (code, err) == (2, f"grpo.py: error: {path}:1: system_prompt: '\\ud800' is not valid Unicode text")
    command = [os.fsencode(sys.executable), os.path.join(ROOT, "grpo.py").encode(), b"--prefill=\xff",
               f"--out_dir={tmp_path / 'run'}".encode()]
    result = subprocess.run(command, capture_output=True)
    assert result.returncode == 2
    assert result.stderr.decode().strip() == "grpo.py: error: prefill: '\\udcff' is not valid Unicode text"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("solution", ["null", "7", '""'])
def test_a_jsonl_solution_that_is_not_text_is_refused_before_the_cold_start(capsys, tmp_path, solution):
    path = tmp_path / "rows.jsonl"
    path.write_text(f'{{"prompt": "1+1", "answer": 2, "solution": {solution}}}\n')
    one_line_refusal(*main(capsys, "--task=jsonl", f"--data_path={path}", "--eval_size=0", "--sft_steps=2",
                           f"--out_dir={tmp_path / 'run'}"),
                     f"{path}:1: missing or empty string field 'solution'")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------
# damaged weights, special files, paths


@pytest.mark.parametrize("how, why", [
    ("empty", "model.safetensors: Error while deserializing header: header too small"),
    ("truncated", "model.safetensors: Error while deserializing header: incomplete metadata"),
    ("garbage", "model.safetensors: Error while deserializing header"),
    ("config", "config.json: not JSON"),
])
def test_a_model_with_damaged_weights_is_one_line(capsys, tmp_path, tiny_dir, how, why):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    weights = model / "model.safetensors"
    raw = weights.read_bytes()
    if how == "config":
        (model / "config.json").write_text("{")
    else:
        weights.write_bytes({"empty": b"", "truncated": raw[:len(raw) // 2],
                             "garbage": bytes(random_bytes(len(raw)))}[how])
    code, err = main(capsys, f"--model={model}", "--max_steps=1", f"--out_dir={tmp_path / 'run'}")
    one_line_refusal(code, err, f"model: {model}: ")
    assert why in err
    assert not (tmp_path / "run" / "train_config.json").exists()


def random_bytes(n):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).tolist()


def test_a_resume_whose_reference_model_is_damaged_changes_nothing(capsys, run):
    (run / "tiny" / "model.safetensors").write_bytes(b"")
    before = snapshot(run)
    one_line_refusal(*main(capsys, f"--resume={run}", "--max_steps=3"),
                     f"model: {run}/tiny: model.safetensors")
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_config_that_is_a_device_a_fifo_or_huge_is_refused_at_once(tmp_path):
    fifo, huge = tmp_path / "fifo", tmp_path / "huge.py"
    os.mkfifo(fifo)
    huge.write_text("# " + "x" * (5 << 20) + "\n")
    code, err = cli("--config=", f"--out_dir={tmp_path / 'run'}")
    assert (code, err) == (2, "grpo.py: error: config: no file named (--config FILE)")
    for path, why in [("/dev/zero", "not a regular file"), (fifo, "not a regular file"),
                      (huge, "larger than 4 MiB, too large for a config")]:
        code, err = cli(f"--config={path}", f"--out_dir={tmp_path / 'run'}")
        assert (code, err) == (2, f"grpo.py: error: {path}: {why}")


def test_run_directory_paths(capsys, tmp_path, monkeypatch):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    one_line_refusal(*main(capsys, f"--out_dir={link}"),
                     f"out_dir: {link}: {link} is a link to {tmp_path / 'nowhere'}, which does not exist")
    for folder in ("/sys/x", "/proc/x"):
        code, err = main(capsys, f"--out_dir={folder}", "--max_steps=1", "--sft_steps=0", "--eval_size=0")
        one_line_refusal(code, err, f"out_dir: {folder}")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text('{"prompt": "1+1", "answer": 2}\n' * 300)
    cfg = grpo.parse_config(["--out_dir=~/runs/x", "--task=jsonl", "--data_path=~/rows.jsonl"])
    assert cfg.out_dir == str(tmp_path / "runs" / "x") and cfg.data_path == str(tmp_path / "rows.jsonl")
    assert grpo.parse_config(["--out_dir=relative"]).out_dir == str(tmp_path / "relative")
    (tmp_path / "relative").mkdir()
    assert runs.run_dir(grpo.Config(resume="relative", out_dir="./relative"), ["--out_dir=./relative"]) \
        == str(tmp_path / "relative")
    assert not (tmp_path / "~").exists()


# ----------------------------------------------------------------------------
# what cannot work is refused; what takes long is said


def test_a_temperature_that_leaves_float_range_is_refused(capsys, tmp_path):
    for value in ("1e-50", "1e-4"):
        one_line_refusal(*main(capsys, f"--temperature={value}", f"--out_dir={tmp_path / 'run'}"),
                         f"temperature: {float(value):g} is below 0.001")
    grpo.parse_config(["--temperature=0.001"])


@pytest.mark.slow
def test_countdown_holds_out_at_most_its_training_size_and_a_long_evaluation_is_said(capsys, tmp_path,
                                                                                       monkeypatch):
    code, err = main(capsys, "--task=countdown", "--eval_size=5000000", f"--out_dir={tmp_path / 'run'}")
    one_line_refusal(code, err, "eval_size: at most 100000 countdown questions held out")
    stop_at(monkeypatch, data, "initial_model")
    for size, said in [(200, False), (20_000, True)]:
        with pytest.raises(Loaded):
            args = [f"--eval_size={size}", "--digits=3", f"--out_dir={tmp_path / str(size)}"]
            grpo.train(grpo.parse_config(args))
        out = capsys.readouterr().out
        assert (f"note: each evaluation samples all {size} held-out questions" in out) == said, out
