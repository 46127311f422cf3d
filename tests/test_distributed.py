"""torchrun on CPU (gloo): 2 ranks must make the same updates as one process on the same global
batch, with DDP and with FSDP, and leave one set of logs and checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

import distributed
import grpo
import runs

# every path the update takes: cold start, KL, reference sync, mu = 2, uneven micro-batches, and a
# reward that varies with length so that every group has non-zero advantages
ARGS = ["--max_steps=3", "--prompts_per_step=4", "--group_size=4", "--sft_steps=5", "--sft_batch_size=8",
        "--eval_size=8", "--micro_batch_size=5", "--ref_sync_every=2", "--ref_sync_alpha=0.5",
        "--num_iterations=2", "--save_every=2", "--lr=1e-3", "--rewards=overlong:1", "--overlong_buffer=16",
        "--log_samples_every=0"]


def launch(args, ranks=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--standalone", f"--nproc_per_node={ranks}"]
    result = subprocess.run(launcher + [os.path.join(ROOT, "grpo.py"), *args], env=env, capture_output=True,
                            text=True, timeout=600)  # a hang guard only
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def run_outputs(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return load_file(os.path.join(run_dir, "model.safetensors")), rows


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("single") / "run")
    launch(ARGS + [f"--out_dir={run_dir}"])
    return run_dir


def assert_same_run(reference_dir, run_dir):
    reference_weights, reference_rows = run_outputs(reference_dir)
    weights, rows = run_outputs(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for ours, theirs in zip(rows, reference_rows):
        # the same completions were sampled
        for key in ("reward_mean", "completion_len_mean", "zero_std_frac"):
            assert ours[key] == theirs[key], key
        for key in ("loss", "kl", "grad_norm", "entropy", "clip_low_frac"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-7), key
    assert any(r["ref_synced"] for r in rows) and all(r["grad_norm"] > 0 and r["kl"] > 0 for r in rows)
    assert weights.keys() == reference_weights.keys()
    assert max((weights[k] - reference_weights[k]).abs().max().item() for k in weights) < 1e-4
    start = load_file(os.path.join(run_dir, "cold_start", "model.safetensors"))
    # the updates were not empty
    assert max((weights[k] - start[k]).abs().max().item() for k in weights) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_ranks_make_the_same_updates_as_one_process(tmp_path, one_process, sharding):
    run_dir = str(tmp_path / "run")
    result = launch(ARGS + [f"--out_dir={run_dir}", f"--sharding={sharding}"], ranks=2)
    assert_same_run(one_process, run_dir)
    # one set of logs and checkpoints, written by rank 0
    assert result.stdout.count("---- summary") == 1 and result.stdout.count("config:") == 1
    assert (sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint"))
            == ["checkpoint-000002", "checkpoint-000003"])
    assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp")]
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert json.load(f)["ranks"] == 2
    state = torch.load(os.path.join(run_dir, "checkpoint-000003", "trainer_state.pt"), weights_only=True)
    assert "ref_model" in state and state["optimizer"]["state"]  # whole, not rank 0's shard


@pytest.mark.slow
def test_a_run_resumes_on_another_number_of_ranks_and_sharding(tmp_path, one_process):
    run_dir = str(tmp_path / "run")
    launch(ARGS + [f"--out_dir={run_dir}", "--max_steps=2"])
    launch([f"--resume={run_dir}", "--max_steps=3", "--sharding=fsdp"], ranks=2)
    assert_same_run(one_process, run_dir)


@pytest.mark.slow
def test_two_ranks_with_tools_make_the_same_steps_as_one_process(tmp_path, caller_dir):
    """With the calculator: one rank's rows may still be calling while the other's are done, so
    every rank samples each round (the samplers' stop checks are collectives). From a model that
    calls (caller_dir), as a long cold start would amplify the ranks' float rounding."""
    triples = zip(range(10, 74), range(99, 35, -1), [1, 5, 9, 3] * 16)
    rows = [{"prompt": f"{a}*{b}+{c}", "answer": str(a * b + c)} for a, b, c in triples]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["--task=jsonl", f"--data_path={tmp_path / 'rows.jsonl'}", "--tools=calculator",
            f"--model={caller_dir}", "--max_new_tokens=100", "--lr=1e-3", "--max_steps=3",
            "--prompts_per_step=4", "--group_size=4",
            "--eval_size=8", "--save_every=3", "--log_samples_every=0"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    launch(args + [f"--out_dir={one}"])
    launch(args + [f"--out_dir={two}"], ranks=2)
    (weights_one, rows_one), (weights_two, rows_two) = run_outputs(one), run_outputs(two)
    for ours, theirs in zip(rows_two, rows_one):
        for key in ("reward_mean", "tool_calls", "tool_call_frac", "completion_len_mean", "accuracy"):
            assert ours[key] == theirs[key], key
        for key in ("loss", "kl", "grad_norm", "entropy"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-7), key
    assert all(r["tool_calls"] > 0 and r["grad_norm"] > 0 for r in rows_one)
    assert max((weights_two[k] - weights_one[k]).abs().max().item() for k in weights_one) < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not runs.installed("peft"), reason="LoRA needs peft")
def test_two_ranks_train_the_same_lora_adapters_as_one_process(tmp_path):
    """DDP over the adapters alone (after a full-weight cold start): the same steps and the same
    merged model as one process, whose reference is the cold-started base with adapters off."""
    args = ([a for a in ARGS if not a.startswith("--ref_sync")]
            + ["--lora_rank=4", "--lora_alpha=16", "--lr=1e-2"])
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    launch(args + [f"--out_dir={one}"])
    launch(args + [f"--out_dir={two}"], ranks=2)
    (weights_one, rows_one), (weights_two, rows_two) = run_outputs(one), run_outputs(two)
    for ours, theirs in zip(rows_two, rows_one):
        assert ours["reward_mean"] == theirs["reward_mean"]
        for key in ("loss", "kl", "grad_norm"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-7), key
    assert all(r["grad_norm"] > 0 for r in rows_one) and rows_one[-1]["kl"] > 0
    assert max((weights_two[k] - weights_one[k]).abs().max().item() for k in weights_one) < 1e-4
    assert os.path.isfile(os.path.join(two, "checkpoint-000003", "adapter", "adapter_model.safetensors"))


def test_batch_sizes_must_divide_among_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(grpo.ConfigError, match="prompts_per_step: 8 does not divide among 3 ranks"):
        grpo.parse_config([])
    with pytest.raises(grpo.ConfigError, match="sft_batch_size: 32 does not divide among 3 ranks"):
        grpo.parse_config(["--prompts_per_step=6"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert grpo.parse_config([]).prompts_per_step == 8


def test_outside_torchrun_the_collectives_are_identities():
    x = torch.arange(6.0).view(3, 2)
    assert distributed.all_sum(x) is x and distributed.gather(x) is x
    assert distributed.rank_and_world() == (0, 1)
    assert torch.equal(distributed.my_share(x), x) and distributed.strided_share([1, 2, 3]) == [1, 2, 3]
    assert (distributed.padded_share([1, 2, 3]) == ([1, 2, 3], 3) and distributed.any_rank([]) is False
            and distributed.any_rank([15]))


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2", os.path.join(ROOT, "grpo.py"), *ARGS,
                                 "--max_steps=500", "--save_every=1000", f"--out_dir={run_dir}"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, metrics = time.time() + 300, run_dir / "metrics.jsonl"  # a hang guard only
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:  # two steps done
            assert launcher.poll() is None and time.time() < deadline
            time.sleep(0.2)
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)],
                                 capture_output=True, text=True).stdout.split()
        rank_one = [pid for pid in workers if b"RANK=1\0" in open(f"/proc/{pid}/environ", "rb").read()]
        os.kill(int(rank_one[0]), signal.SIGTERM)
        launcher.communicate(timeout=300)
    finally:
        launcher.kill()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= steps[-1] < 500 and steps == list(range(1, steps[-1] + 1))
    # rank 0 saved, though rank 1 got the signal
    assert (run_dir / "latest").read_text() == f"checkpoint-{steps[-1]:06d}"
    launch([f"--resume={run_dir}", f"--max_steps={steps[-1] + 1}"], ranks=2)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == steps[-1] + 1


FAILING_RANK = """
import os, sys, time, traceback
sys.path.insert(0, {root!r})
import engine, grpo, runs
calls = []
def failing(real, limit):
    def wrapped(self, *args, **kwargs):
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == limit:
            raise RuntimeError("CUDA out of memory (injected on rank 1)")
        return real(self, *args, **kwargs)
    return wrapped
if {where!r} == "before the first check":
    engine.Engine.sample_once = failing(engine.Engine.sample_once, 2)
else:
    engine.StaticDecoder.decode_step = failing(engine.StaticDecoder.decode_step, 40)
try:
    code = grpo.main(sys.argv[1:])
except Exception:
    traceback.print_exc()
    if os.environ["RANK"] == "1":
        time.sleep(600)  # alive and silent, as a rank on another node whose exit is not seen
    raise
runs.exit(code)
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before the first check", "between two checks"])
def test_a_rank_that_fails_while_sampling_stops_the_others(tmp_path, where):
    """Rank 1's sampler raises (an OOM, at its second call, or mid-decode) and rank 1 then stays up,
    silent, as a rank on another node would: rank 0 stops at its next check of sampling, with one
    line, instead of waiting for rank 1 in a collective until the timeout; the run directory keeps
    what it had (the step before, no half-written file)."""
    script, run_dir = tmp_path / "failing_rank.py", tmp_path / "run"
    script.write_text(FAILING_RANK.format(root=ROOT, where=where))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(script), *ARGS, "--eval_size=0", "--max_steps=4",
                             f"--out_dir={run_dir}"], env=env, capture_output=True, text=True,
                            timeout=300)  # a hang guard only
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "grpo.py: rank 0 stopped: another rank failed while sampling (its error is in its own output)" \
        in output
    assert "RuntimeError: CUDA out of memory (injected on rank 1)" in output
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 4
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
