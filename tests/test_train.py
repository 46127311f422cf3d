"""Whole runs on the tiny model: the command line end to end, checkpoints, resume, the reference model."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import engine
import grpo
import runs
from conftest import ROOT, SHARED
from transformers import AutoModelForCausalLM as AutoModel

# a cold start long enough to earn some format reward, and a length reward, so that every step
# has groups with unequal rewards and really updates the policy
FAST = ["--sft_steps=60", "--eval_size=16", "--prompts_per_step=4", "--group_size=4", "--max_new_tokens=20",
        "--log_samples_every=0", "--rewards=accuracy:1,format:0.5,overlong:0.5", "--overlong_buffer=16"]
TIMINGS = {"t_sample", "t_rewards", "t_logprobs", "t_update", "t_weight_sync", "tokens_per_sec"}
ROW_KEYS = {"step", "lr", "loss", "reward_mean", "reward_std", "reward_accuracy", "reward_format", "accuracy",
            "zero_std_frac", "completion_len_mean", "completion_len_max", "truncated_frac", "kl",
            "clip_low_frac", "clip_high_frac", "entropy", "grad_norm", "updates", "reward_errors",
            "ref_synced", "reflection_frac"} | TIMINGS


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timings(rows):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


@pytest.mark.slow
def test_command_line_run_end_to_end(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), *FAST, "--max_steps=3",
                             "--save_every=2", f"--out_dir={run}"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "---- summary" in result.stdout and "held-out greedy accuracy" in result.stdout
    assert "grpo [" in result.stderr          # the progress bar
    assert "Writing model shards" not in result.stderr  # ours is the only one
    summary = json.loads((run / "summary.json").read_text())
    assert {"accuracy_before", "accuracy_after", "wall_seconds"} <= set(summary)
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(ROW_KEYS <= set(r) for r in rows)
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 3
    assert (run / "latest").read_text() == "checkpoint-000003"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run)           # the final model, in plain transformers
    saved = AutoModelForCausalLM.from_pretrained(run / "checkpoint-000003")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), saved.parameters()))
    assert AutoTokenizer.from_pretrained(run).eos_token == "<eos>"


def test_resumed_run_reproduces_the_uninterrupted_one(tmp_path):
    # constant lr so that the first half's schedule does not depend on max_steps; every stateful
    # part on: reference syncing (its weights are checkpointed), mu = 2 (old log-probs), KL
    common = FAST + ["--warmup_steps=0", "--min_lr_ratio=1.0", "--beta=0.04", "--ref_sync_every=2",
                     "--ref_sync_alpha=0.5", "--num_iterations=2", "--save_every=3", "--micro_batch_size=5"]
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    grpo.train(grpo.parse_config(common + ["--max_steps=6", f"--out_dir={whole}"]))
    first = grpo.train(grpo.parse_config(common + ["--max_steps=3", f"--out_dir={part}"]))
    # a row logged after the last checkpoint (as if the run died there) is dropped on resume
    with open(os.path.join(part, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    second = grpo.train(grpo.parse_config([f"--resume={part}", "--max_steps=6"]))
    a, b = metrics(whole), metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert without_timings(a) == without_timings(b)
    assert all(r["grad_norm"] > 0 and r["zero_std_frac"] < 1 for r in a) and all(r["kl"] > 0 for r in a[1:])
    assert [r["ref_synced"] for r in a] == [False, True, False, True, False, True]
    assert second["accuracy_before"] == first["accuracy_before"]
    full = engine.load_model(whole, "cpu")[0]
    resumed = engine.load_model(part, "cpu")[0]
    assert all(torch.equal(x, y) for x, y in zip(full.parameters(), resumed.parameters()))


@pytest.mark.slow
def test_a_run_saved_under_the_old_names_resumes_as_before(tmp_path):
    """loss_type=cispo was CISPO's surrogate with a token mean; a run directory saved under that name
    (before `surrogate` existed) resumes as surrogate=cispo, loss_type=dapo, and goes on exactly as
    a run that used the new names from the start."""
    common = FAST + ["--warmup_steps=0", "--min_lr_ratio=1.0", "--num_iterations=2", "--save_every=2"]
    new, old = str(tmp_path / "new"), str(tmp_path / "old")
    grpo.train(grpo.parse_config(common + ["--surrogate=cispo", "--loss_type=dapo", "--max_steps=4",
                                           f"--out_dir={new}"]))
    grpo.train(grpo.parse_config(common + ["--loss_type=cispo", "--max_steps=2", f"--out_dir={old}"]))
    path = os.path.join(old, "train_config.json")
    with open(path) as f:
        saved = json.load(f)
    saved["loss_type"] = "cispo"  # as the trainer wrote it before the names were split
    del saved["surrogate"]
    with open(path, "w") as f:
        json.dump(saved, f)
    cfg = grpo.parse_config([f"--resume={old}", "--max_steps=4"])
    assert (cfg.surrogate, cfg.loss_type) == ("cispo", "dapo")
    grpo.train(cfg)
    assert without_timings(metrics(new)) == without_timings(metrics(old))


@pytest.mark.slow
def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    runs = [(0, "a"), (0, "b"), (1, "c")]
    for seed, name in runs:
        grpo.train(grpo.parse_config(FAST + ["--max_steps=2", f"--seed={seed}",
                                             f"--out_dir={tmp_path / name}"]))
    a, b, c = (without_timings(metrics(tmp_path / name)) for _, name in runs)
    assert a == b and a != c


@pytest.mark.parametrize("beta, loads", [(0.0, 1), (0.04, 2)])
def test_beta_zero_loads_no_reference_model(tmp_path, monkeypatch, beta, loads):
    calls = []
    real = engine.load_model
    monkeypatch.setattr(engine, "load_model", lambda *a: calls.append(a) or real(*a))
    grpo.train(grpo.parse_config(FAST + ["--max_steps=1", "--sft_steps=0", f"--beta={beta}",
                                         f"--out_dir={tmp_path}"]))
    assert len(calls) == loads
    assert (metrics(tmp_path)[0]["kl"] is None) == (beta == 0)


@pytest.mark.slow
def test_every_flag_combination_runs(tmp_path):
    grpo.train(grpo.parse_config(FAST + [
        "--max_steps=2", "--loss_type=dr_grpo", "--scale_rewards=none", "--clip_eps_high=0.28",
        "--mask_truncated=True", "--drop_zero_std_groups=True",
        "--rewards=accuracy:1,format:0.5,language:0.1,overlong:1", "--overlong_buffer=4",
        "--top_p=0.9", "--temperature=0.8", "--eval_every=1", "--template=r1zero", f"--out_dir={tmp_path}"]))
    rows = metrics(tmp_path)
    assert len(rows) == 2 and "eval_accuracy" in rows[0] and "reward_overlong" in rows[0]


@pytest.mark.slow
def test_pad_token_equal_to_eos_trains(tmp_path, tiny_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model_dir = tmp_path / "pad_is_eos"
    import shutil
    shutil.copytree(tiny_dir, model_dir)
    tokenizer.save_pretrained(model_dir)
    assert engine.load_model(str(model_dir), "cpu")[1].pad_token_id == tokenizer.eos_token_id
    grpo.train(grpo.parse_config(FAST + ["--max_steps=2", f"--model={model_dir}",
                                         f"--out_dir={tmp_path / 'run'}"]))
    rows = metrics(tmp_path / "run")
    # EOS-padding after the first EOS is not counted as completion text
    assert all(r["completion_len_mean"] < 20 and r["truncated_frac"] < 1 for r in rows)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """compile=True (torch.compile of the log-prob forward) trains as eager does."""
    for flag in ("False", "True"):
        grpo.train(grpo.parse_config(FAST + ["--max_steps=2", "--eval_size=0", f"--compile={flag}",
                                             f"--out_dir={tmp_path / flag}"]))
    eager, compiled = metrics(tmp_path / "False"), metrics(tmp_path / "True")
    for a, b in zip(eager, compiled):
        assert a["reward_mean"] == b["reward_mean"]        # the same samples (sampling runs eager)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["kl"] == pytest.approx(b["kl"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_a_new_run_never_mixes_with_an_old_one(tmp_path, capsys):
    grpo.train(grpo.parse_config(FAST + ["--max_steps=1", "--sft_steps=0", "--eval_size=0",
                                         f"--out_dir={tmp_path}"]))
    assert grpo.main(FAST + ["--max_steps=1", f"--out_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"grpo.py: error: out_dir: {tmp_path} already holds a run; continue it with --resume={tmp_path}, "
        "or start anew in another --out_dir")
    assert [r["step"] for r in metrics(tmp_path)] == [1]      # the old run is untouched


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow
def test_bfloat16_keeps_fp32_master_weights_and_tracks_float32(tmp_path):
    """dtype=bfloat16 at lr 1e-6: bf16 weights would round nearly every AdamW step away (about
    1 % of weights moved in 5 steps); with fp32 master weights under bf16 compute (nearly) every
    weight moves, and the run's weights follow the fp32 run's."""
    args = ["--sft_steps=0", "--eval_size=0", "--prompts_per_step=4", "--group_size=4", "--max_new_tokens=12",
            "--rewards=overlong:1,format:1", "--overlong_buffer=12", "--log_samples_every=0",
            "--warmup_steps=0", "--lr=1e-6", "--min_lr_ratio=1.0", "--beta=0.04", "--max_steps=20"]
    for dtype in ("float32", "bfloat16"):
        grpo.train(grpo.parse_config(args + [f"--dtype={dtype}", f"--out_dir={tmp_path / dtype}"]))
    start = flat(engine.load_model(str(tmp_path / "float32" / "tiny"), "cpu")[0])
    fp32, bf16 = (flat(AutoModel.from_pretrained(tmp_path / d)) for d in ("float32", "bfloat16"))
    assert bf16.dtype == torch.float32                       # the checkpoint holds the master weights
    assert (bf16 != start).float().mean() > 0.99 and (fp32 != start).float().mean() > 0.99
    # same direction as the fp32 run (bf16 compute flips the sign of Adam's step where a gradient
    # is tiny; measured: cosine 0.93; with bf16 weights it was 0.0001)
    assert torch.nn.functional.cosine_similarity(bf16 - start, fp32 - start, 0) > 0.85
    assert len(metrics(tmp_path / "bfloat16")) == 20


def test_a_step_without_an_update_logs_null_not_zero(tmp_path):
    """With every group's rewards equal (an untrained model never earns the format reward) and
    drop_zero_std_groups, the loss sees no token and no update is made: loss, KL, clip fractions
    and grad norm are null, not 0.0 (which would read as a collapse); entropy comes from sampling."""
    grpo.train(grpo.parse_config(["--sft_steps=0", "--eval_size=0", "--prompts_per_step=2", "--group_size=4",
                                  "--max_new_tokens=8", "--rewards=format:1", "--drop_zero_std_groups=True",
                                  "--max_steps=2", f"--out_dir={tmp_path}"]))
    for row in metrics(tmp_path):
        assert row["zero_std_frac"] == 1.0 and row["updates"] == 0
        assert all(row[k] is None for k in ("loss", "kl", "clip_low_frac", "clip_high_frac", "grad_norm"))
        assert row["entropy"] > 1.0      # a random model over ~100 tokens: far from collapsed


def test_sampled_entropy_is_the_mean_over_completion_tokens(tiny):
    model, tokenizer = tiny
    ids = torch.tensor([tokenizer("12+34\n")["input_ids"]] * 3)
    eos = engine.stop_ids(model, tokenizer)
    u = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    how = engine.Sampling(10, eos, tokenizer.pad_token_id, 0.7, 1.0, u)
    out = grpo.sample(model, ids, torch.ones_like(ids), how)
    tokens, logp, entropy = out.tokens, out.logp, out.entropy
    full = torch.cat([ids, tokens], 1)
    with torch.no_grad():  # the same log-probs and entropies from one pass over the sampled sequences
        expected_logp, expected = grpo.completion_logprobs(model, full, torch.ones_like(full),
                                                             tokens.size(1), 0.7)
    assert torch.allclose(entropy, expected, atol=1e-4) and torch.allclose(logp, expected_logp, atol=1e-4)


def test_demo_defaults_apply_to_the_demo_model_only(capsys, tmp_path):
    demo = grpo.parse_config([])
    assert (demo.sft_steps, demo.sft_lr, demo.lr, demo.max_new_tokens) == (150, 1e-3, 3e-4, 32)
    pretrained = grpo.parse_config(["--model=HuggingFaceTB/SmolLM2-135M-Instruct", "--task=gsm8k",
                                    "--data_path=" + os.path.join(SHARED, "train.jsonl")])
    assert ((pretrained.sft_steps, pretrained.sft_lr, pretrained.lr, pretrained.max_new_tokens)
            == (0, 1e-5, 1e-6, 256))
    # asked for: kept
    assert grpo.parse_config(["--model=x/y", "--lr=3e-5", "--sft_steps=10"]).lr == 3e-5
    assert grpo.parse_config(["--model=x/y", "--sft_steps=10"]).sft_steps == 10
    with pytest.raises(SystemExit):
        grpo.main(["--help"])
    assert '--lr=None' in capsys.readouterr().out
    grpo.train(grpo.parse_config(["--sft_steps=0", "--max_steps=1", "--eval_size=0", "--prompts_per_step=2",
                                  "--group_size=2", f"--out_dir={tmp_path / 'run'}"]))
    printed = capsys.readouterr().out
    assert "  lr = 0.0003  # the default for the tiny demo" in printed and "  sft_steps = 0\n" in printed


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_in_the_policy_by_default(tmp_path, disable):
    """A model configured with dropout: with disable_dropout the update's log-probs (train mode)
    equal the sampler's (eval mode); without it they do not."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    _, tokenizer = engine.load_model(data.build_tiny_model(str(tmp_path / "tok"), 0), "cpu")
    shapes = dict(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, bos_token_id=None)
    for model in (LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, attention_dropout=0.5, **shapes)),
                  GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.5, embd_pdrop=0.5,
                                             attn_pdrop=0.5, **shapes))):
        if disable:
            engine.disable_dropout(model)
        ids = torch.randint(3, 50, (4, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            sampler = grpo.completion_logprobs(model.eval(), ids, torch.ones_like(ids), 6)[0]
            update = grpo.completion_logprobs(model.train(), ids, torch.ones_like(ids), 6)[0]
        assert torch.allclose(sampler, update, atol=1e-6) == disable, type(model).__name__


def test_each_phase_is_timed_after_the_device_finishes_it(tmp_path, monkeypatch):
    """GPU kernels run asynchronously: t_sample, t_rewards, t_logprobs and t_update are each read
    by runs.clock, which waits for the device (on CUDA) before reading the time."""
    ticks = iter(range(10**6))
    devices = []
    monkeypatch.setattr(runs, "clock", lambda device: devices.append(device.type) or next(ticks) * 10.0)
    grpo.train(grpo.parse_config(["--sft_steps=0", "--eval_size=0", "--prompts_per_step=2", "--group_size=2",
                                  "--max_new_tokens=4", "--max_steps=2", f"--out_dir={tmp_path}"]))
    rows = metrics(tmp_path)
    # a step's start and its four phases' ends, each through clock
    assert devices == ["cpu"] * 10
    assert all(r["t_rewards"] == r["t_logprobs"] == r["t_update"] == 10.0 for r in rows)


def test_samples_log_holds_each_question_with_its_group(tmp_path):
    """samples.jsonl every log_samples_every steps: each question of the step with its G
    completions, each reward, the weighted total, the advantage (the group's (r - mean) / (std +
    eps), recomputed here by hand), the length and whether it was truncated."""
    grpo.train(grpo.parse_config([*FAST[:-3], "--rewards=accuracy:1,format:0.5,overlong:0.5",
                                  "--overlong_buffer=16", "--log_samples_every=2", "--max_steps=4",
                                  "--sft_steps=10", f"--out_dir={tmp_path}"]))
    with open(tmp_path / "samples.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [2] * 4 + [4] * 4 and all(len(r["completions"]) == 4 for r in rows)
    for row in rows:
        rewards = torch.tensor([c["reward"] for c in row["completions"]])
        for c in row["completions"]:
            parts = c["rewards"]
            assert set(parts) == {"accuracy", "format", "overlong"} and 0 < c["length"] <= 20
            assert c["reward"] == pytest.approx(parts["accuracy"] + 0.5 * parts["format"]
                                                + 0.5 * parts["overlong"], abs=1e-6)
            assert not c["truncated"] or c["length"] == 20    # no EOS: the whole max_new_tokens
        spread = rewards.std()
        expected = (rewards - rewards.mean()) / (spread + 1e-4) if spread > 0 else torch.zeros(4)
        assert torch.allclose(torch.tensor([c["advantage"] for c in row["completions"]]), expected, atol=1e-5)
    json.loads(json.dumps(rows[0]))  # plain JSON: python -m json.tool reads each line


def test_a_resumed_run_drops_the_sample_rows_past_its_checkpoint(tmp_path):
    """As for metrics.jsonl: rows a crashed run wrote after its last checkpoint (and a torn last
    line) are dropped when it resumes, and those steps are logged again, once."""
    args = [*FAST[:-3], "--rewards=accuracy:1,format:0.5", "--log_samples_every=1", "--sft_steps=4",
            "--save_every=2", f"--out_dir={tmp_path}"]
    grpo.train(grpo.parse_config([*args, "--max_steps=2"]))
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "prompt": "left by a crash"}) + "\n" + '{"step": 4, "pro')
    grpo.train(grpo.parse_config([f"--resume={tmp_path}", "--max_steps=3"]))
    with open(tmp_path / "samples.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4 and all("completions" in r for r in rows)


def test_a_reward_of_your_own_from_a_file(tmp_path, capsys):
    """rewards="...,FILE.py:FUNCTION:weight" loads (completion, example) -> float from the user's
    file; example carries every field of the JSONL row; a raise scores 0 and is counted; a bad
    file or name stops the run in one line, exit 2, before any model loads."""
    (tmp_path / "mine.py").write_text(
        "def near_target(completion, example):\n    return -abs(len(completion) - example['target_len'])\n\n"
        "def broken(completion, example):\n    raise RuntimeError('a bug in my reward')\n")
    rows = [{"prompt": f"{a}+{b}", "answer": str(a + b), "target_len": 5}
            for a in range(10) for b in range(10)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"accuracy:1,{tmp_path}/mine.py:near_target:0.1,{tmp_path}/mine.py:broken:1"
    grpo.train(grpo.parse_config(["--task=jsonl", f"--data_path={tmp_path}/data.jsonl", "--eval_size=10",
                                  "--sft_steps=0", "--max_new_tokens=8", "--prompts_per_step=2",
                                  "--group_size=4", "--max_steps=2", "--log_samples_every=1",
                                  f"--rewards={spec}", f"--out_dir={tmp_path}/run"]))
    row = metrics(tmp_path / "run")[0]
    # every completion, counted
    assert row[f"reward_{tmp_path}/mine.py:broken"] == 0.0 and row["reward_errors"] == 8
    with open(tmp_path / "run" / "samples.jsonl") as f:
        completions = [c for line in f for c in json.loads(line)["completions"]]
    assert all(c["rewards"][f"{tmp_path}/mine.py:near_target"] == -abs(len(c["text"]) - 5)
               for c in completions)
    capsys.readouterr()
    for bad, message in [(f"{tmp_path}/nope.py:f", f"cannot load {tmp_path}/nope.py: no such file"),
                         (f"{tmp_path}/mine.py:gone", "has no function 'gone'")]:
        assert grpo.main([f"--rewards=accuracy:1,{bad}", f"--out_dir={tmp_path}/bad"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("grpo.py: error: rewards: ") and message in err and "\n" not in err
        assert not (tmp_path / "bad").exists()
