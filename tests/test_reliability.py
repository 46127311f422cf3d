"""Faults lose nothing: kills during checkpoint writes, signals, non-finite steps, bad input."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import engine
import grpo
import runs
from conftest import ROOT

# a tiny run where every step has a learning signal (a length reward) and saves cheaply
ARGS = ["--sft_steps=0", "--eval_size=0", "--prompts_per_step=2", "--group_size=4", "--max_new_tokens=12",
        "--rewards=overlong:1,format:1", "--overlong_buffer=12", "--log_samples_every=0", "--warmup_steps=0"]
TIMINGS = {"t_sample", "t_rewards", "t_logprobs", "t_update", "tokens_per_sec"}

# runs grpo.main, but SIGKILLs itself just before the Nth call of one function made after the
# run's first checkpoint exists: a crash at an exact point of a checkpoint write
KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import grpo, shutil, torch
module, name, nth, run_dir = {{"torch": torch, "os": os, "shutil": shutil}}[sys.argv[1]], sys.argv[2], \
int(sys.argv[3]), sys.argv[4]
real, calls = getattr(module, name), [0]
def wrapper(*args, **kwargs):
    if os.path.exists(os.path.join(run_dir, "latest")):
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(module, name, wrapper)
sys.exit(grpo.main(sys.argv[5:]))
"""


def grpo_cmd(*args):
    return [sys.executable, os.path.join(ROOT, "grpo.py"), *args]


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run to compare the interrupted ones against."""
    run = str(tmp_path_factory.mktemp("reference"))
    grpo.train(grpo.parse_config(ARGS + ["--max_steps=6", "--save_every=2", f"--out_dir={run}"]))
    return rows(run)


def assert_checkpoint_loads(run):
    from transformers import AutoModelForCausalLM
    checkpoint = runs.open_resumed_run(str(run))[1]
    state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=True)
    AutoModelForCausalLM.from_pretrained(checkpoint)
    AutoModelForCausalLM.from_pretrained(run)
    return state["step"]


@pytest.mark.parametrize("module, name, nth", [
    # the calls counted are those of the second checkpoint (step 4), the first being complete
    ("torch", "save", 1),        # model files written, the trainer state not yet
    ("os", "replace", 1),        # complete, but not yet renamed into place
    ("os", "replace", 2),        # renamed, none of its model files linked into the run directory yet
    ("os", "replace", 4),        # halfway through linking them (5 files)
    ("os", "replace", 7),        # all linked, `latest` not yet pointing at it
    ("shutil", "rmtree", 2),     # `latest` updated, the older checkpoint not yet pruned
])
@pytest.mark.slow
def test_sigkill_at_each_point_of_a_checkpoint_write(tmp_path, reference, module, name, nth):
    run = tmp_path / "run"
    args = ARGS + ["--max_steps=6", "--save_every=2", "--keep_checkpoints=1", f"--out_dir={run}"]
    killed = subprocess.run([sys.executable, "-c", KILLER.format(root=ROOT), module, name, str(nth), str(run),
                             *args], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert assert_checkpoint_loads(run) in (2, 4)
    resumed = subprocess.run(grpo_cmd(f"--resume={run}"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert rows(run) == reference
    assert not list(run.glob("*.tmp")) and [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-000006"]


@pytest.mark.slow
def test_repeated_sigkill_at_random_moments(tmp_path):
    """SIGKILL again and again at random times while a run saves every step; each time the latest
    checkpoint loads, and the run resumed after the last kill finishes with the uninterrupted metrics."""
    args = ARGS + ["--max_steps=60", "--save_every=1", "--keep_checkpoints=2"]
    run = tmp_path / "run"
    grpo.train(grpo.parse_config(args + [f"--out_dir={tmp_path / 'whole'}"]))
    rng, mid_save = random.Random(0), 0
    process = subprocess.Popen(grpo_cmd(*args, f"--out_dir={run}"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    last = 0
    for _ in range(8):
        deadline = time.time() + 120
        while (not (run / "latest").exists() or latest_step(run) <= last) and process.poll() is None:
            assert time.time() < deadline
            time.sleep(0.02)
        if process.poll() is not None:
            break
        time.sleep(rng.uniform(0, 0.3))
        process.kill()
        process.wait()
        mid_save += any(p.name.endswith(".tmp") for p in run.iterdir())
        last = assert_checkpoint_loads(run)
        process = subprocess.Popen(grpo_cmd(f"--resume={run}"), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
    assert process.wait(timeout=300) == 0
    assert rows(run) == rows(tmp_path / "whole")
    print(f"{mid_save} of the kills left a half-written file behind")


def latest_step(run):
    return int((run / "latest").read_text().split("-")[1])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, sig):
    args = ARGS + ["--max_steps=30", "--save_every=1000"]
    grpo.train(grpo.parse_config(args + [f"--out_dir={tmp_path / 'whole'}"]))
    run = tmp_path / "run"
    process = subprocess.Popen(grpo_cmd(*args, f"--out_dir={run}"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.02)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + sig and "Traceback" not in err
    assert f"stopped by {signal.Signals(sig).name} after step" in err
    stopped_at = assert_checkpoint_loads(run)
    assert 3 <= stopped_at < 30 and len(rows(run)) == stopped_at
    assert subprocess.run(grpo_cmd(f"--resume={run}"), capture_output=True, timeout=300).returncode == 0
    assert rows(run) == rows(tmp_path / "whole")


def poison(monkeypatch, bad_calls, kind):
    """Make the update numbered in `bad_calls` (1-based) non-finite: its gradient, or its loss."""
    real, calls = grpo.accumulate_gradients, [0]

    def wrapper(model, *args):
        sums = real(model, *args)
        calls[0] += 1
        if calls[0] in bad_calls:
            if kind == "gradient":
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            else:
                sums["loss"] = sums["loss"] * float("nan")
        return sums
    monkeypatch.setattr(grpo, "accumulate_gradients", wrapper)


def load_checkpoint(run, step):
    path = run / f"checkpoint-{step:06d}"
    model = engine.load_model(str(path), "cpu")[0]
    return ([p.detach() for p in model.parameters()],
            torch.load(path / "trainer_state.pt", weights_only=True)["optimizer"])


@pytest.mark.parametrize("kind", ["gradient", "loss"])
def test_nonfinite_steps_are_skipped_without_touching_weights_or_adam(tmp_path, monkeypatch, kind):
    poison(monkeypatch, {2, 3}, kind)
    grpo.train(grpo.parse_config(ARGS + ["--max_steps=4", "--save_every=1", "--keep_checkpoints=10",
                                         f"--out_dir={tmp_path}"]))
    logged = rows(tmp_path)
    assert [r["skipped"] for r in logged] == [False, True, True, False]
    assert [r["skipped_total"] for r in logged] == [0, 1, 2, 2]
    (w1, adam1), (w3, adam3), (w4, _) = (load_checkpoint(tmp_path, s) for s in (1, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(w1, w3))
    assert adam1["state"].keys() == adam3["state"].keys()
    for key, s1 in adam1["state"].items():
        assert all(torch.equal(s1[k], adam3["state"][key][k]) for k in s1)
    assert not all(torch.equal(a, b) for a, b in zip(w3, w4))       # step 4 updates again


def test_too_many_bad_steps_stop_with_a_message_and_a_usable_checkpoint(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, set(range(1, 100)), "loss")
    code = grpo.main(ARGS + ["--max_steps=20", "--max_bad_steps=3", "--save_every=1000",
                             f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("grpo.py: 3 steps in a row had a non-finite loss or gradient")
    assert assert_checkpoint_loads(tmp_path) == 3
    weights, adam = load_checkpoint(tmp_path, 3)
    initial = engine.load_model(str(tmp_path / "tiny"), "cpu")[0]
    # never stepped
    assert all(torch.equal(a, b) for a, b in zip(weights, initial.parameters())) and adam is None


# ----------------------------------------------------------------------------
# bad input: one line, exit code 2, no traceback


def run_cli(tmp_path, *args, env=None):
    result = subprocess.run(grpo_cmd(*args, f"--out_dir={tmp_path / 'run'}"), capture_output=True, text=True,
                            timeout=300, env=env)
    return result.returncode, result.stderr.strip()


def test_empty_dataset(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    code, err = run_cli(tmp_path, "--task=jsonl", f"--data_path={data}")
    assert code == 2 and err == f"grpo.py: error: {data}: no examples"


def test_arithmetic_split_that_leaves_nothing_to_train_on(tmp_path):
    code, err = run_cli(tmp_path, "--digits=1", "--eval_size=100")
    assert code == 2 and err == ("grpo.py: error: arithmetic: eval_size=100 leaves no training question "
                                 "(81 in all)")


@pytest.mark.slow
def test_model_path_that_does_not_exist(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    code, err = run_cli(tmp_path, "--model=no-such-owner/no-such-model", env=env)
    assert (code == 2 and err.startswith("grpo.py: error: model: no-such-owner/no-such-model: ")
            and "\n" not in err)
    code, err = run_cli(tmp_path, f"--model={tmp_path}/missing")
    assert code == 2 and err == f"grpo.py: error: model: {tmp_path}/missing: no such directory"


@pytest.mark.slow
def test_tokenizer_without_eos(tmp_path, tiny_dir):
    model_dir = tmp_path / "no_eos"
    shutil.copytree(tiny_dir, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    code, err = run_cli(tmp_path, f"--model={model_dir}", "--sft_steps=0")
    assert code == 2 and err == (f"grpo.py: error: model: {model_dir}: the tokenizer has no EOS token, "
                                 "so completions could never end")


@pytest.mark.slow
def test_prompts_longer_than_the_context(tmp_path, tiny_dir):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=?" + " pad" * (70 * (i == 20)),
                                        "answer": i + 1}) + "\n"
                            for i in range(40)))
    # the tiny model's context is 256 tokens; 256 - 32 new tokens leaves 224 for the prompt; line 21 has 287
    common = [f"--model={tiny_dir}", "--task=jsonl", f"--data_path={data}", "--eval_size=10",
              "--max_new_tokens=32"]
    code, err = run_cli(tmp_path, *common, "--prompt_overflow=reject")
    assert code == 2 and err.startswith(f"grpo.py: error: prompt_overflow: {data}:21: a prompt of 287 tokens")
    assert "over max_prompt_tokens=224" in err
    code, err = run_cli(tmp_path, *common, "--max_new_tokens=300")
    assert code == 2 and err == ("grpo.py: error: max_new_tokens: 300 leaves no room for a prompt in the "
                                 "model's context of 256 tokens")
    grpo.train(grpo.parse_config(common + ["--max_steps=30", "--prompts_per_step=1", "--group_size=2",
                                           "--max_new_tokens=4", "--eval_size=0",
                                           f"--out_dir={tmp_path / 'ok'}"]))
    # truncated and counted, once per epoch
    assert sum(r["prompts_cut"] for r in rows(tmp_path / "ok")) == 1


# ----------------------------------------------------------------------------
# one run per directory: a second process is refused, naming the first; a kill leaves no lock


def start_run(*args):
    return subprocess.Popen(grpo_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(run, n, process):
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < n:
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_run_in_a_held_directory_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    first = start_run(*ARGS, "--max_steps=5000", "--save_every=1", f"--out_dir={run}")
    wait_for_rows(run, 2, first)
    for args in ([*ARGS, "--max_steps=200", f"--out_dir={run}", "--seed=1"], [f"--resume={run}"],
                 ["--eval_only=True", f"--model={run}", f"--out_dir={run}"]):
        second = subprocess.run(grpo_cmd(*args), capture_output=True, text=True, timeout=300)
        key = "resume" if args[0].startswith("--resume") else "out_dir"
        assert second.returncode == 2 and second.stderr.strip() == (
            f"grpo.py: error: {key}: {run} is in use by another run (pid {first.pid}); let it finish or stop "
            "it, or use another --out_dir"), second.stderr
    first.kill()                                                  # SIGKILL: the kernel lets go of the lock
    first.wait()
    steps = [r["step"] for r in rows(run)]
    assert steps == list(range(1, len(steps) + 1))                # nobody else wrote a row
    assert json.loads((run / "train_config.json").read_text())["seed"] == 0
    resumed = subprocess.run(grpo_cmd(f"--resume={run}", f"--max_steps={len(steps) + 2}"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in rows(run)] == list(range(1, len(steps) + 3))


@pytest.mark.slow
def test_two_runs_started_at_once_leave_one_run_and_no_temporary_files(tmp_path):
    run = tmp_path / "run"
    fresh = [*ARGS, "--max_steps=4", "--save_every=1", f"--out_dir={run}"]
    for args in (fresh, [f"--resume={run}", "--max_steps=40"]):  # far from done when the other starts
        both = [start_run(*args) for _ in range(2)]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in both]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        refused = next(err for code, err in results if code == 2)
        assert "is in use by another run (pid" in refused or "already holds a run" in refused, refused
        assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert [r["step"] for r in rows(run)] == list(range(1, 41))
    assert (run / "latest").read_text() == "checkpoint-000040"


def test_temporary_names_are_the_writers_own_and_a_resume_clears_them(tmp_path):
    assert runs.temporary(str(tmp_path / "latest")) == f"{tmp_path / 'latest'}.{os.getpid()}.tmp"
    run = tmp_path / "run"
    grpo.train(grpo.parse_config(ARGS + ["--max_steps=2", "--save_every=1", f"--out_dir={run}"]))
    (run / "latest.4242.tmp").write_text("checkpoint-0")
    (run / "model.safetensors.4242.tmp").write_bytes(b"half")
    (run / "checkpoint-000003.4242.tmp").mkdir()
    grpo.train(grpo.parse_config([f"--resume={run}", "--max_steps=3"]))
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    runs.take_run_dir(str(tmp_path / "run"))
    started, ready = os.pipe()
    child = os.fork()
    if child == 0:                                                # the child says it runs, then waits
        os.write(ready, b"!")
        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"!"
        runs.release_run_dir(str(tmp_path / "run"))
        assert runs.hold(os.path.realpath(tmp_path / "run")) is None   # nobody else holds it
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(started)
        os.close(ready)


def test_a_run_directory_holding_damaged_checkpoints_still_loads_as_a_model(tmp_path, tiny_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_dir, run)
    for leftover in ("checkpoint-000010.damaged", "checkpoint-000012.4242.tmp", "tiny"):
        (run / leftover).mkdir()
        (run / leftover / "model.safetensors").write_bytes(b"half")
    assert runs.damaged_weights(str(run)) is None
    engine.load_model(str(run), "cpu")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    assert runs.damaged_weights(str(run)).startswith("adapter/adapter_model.safetensors: ")
