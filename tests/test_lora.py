"""LoRA (optional peft): gradients reach only the adapters, the reference is the base model with
the adapters off, the merged checkpoint is the adapted model, a resumed LoRA run continues
exactly, and every misuse is one line before training."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import engine
import grpo
import runs
from test_train import FAST, metrics, without_timings

peft = pytest.importorskip("peft")
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [5, 9, 9, 3, 4, 10, 11, 6]])
C = 4


def logprobs(model, ids=IDS):
    with torch.no_grad():
        return grpo.completion_logprobs(model, ids, torch.ones_like(ids), C, with_entropy=False)[0]


def adapted(tiny_dir, rank=4):
    """The tiny model with adapters whose B is random, so that they change the output."""
    model, tokenizer = engine.load_model(tiny_dir, "cpu")
    lora = engine.add_lora(model, engine.LoraOptions(rank, 8.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval(), tokenizer, lora


def test_gradients_reach_only_the_adapters(tiny_dir):
    model, tokenizer, _ = adapted(tiny_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("lm_head" in n or "embed" in n for n in trainable)  # all-linear leaves the head out
    logp = engine.Engine(model, tokenizer, grpo.DEFINITION).logprobs(IDS, torch.ones_like(IDS), C)
    logp.sum().backward()
    touched = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched and touched <= trainable


def test_the_reference_is_the_base_model_with_adapters_off(tiny_dir):
    model, _, lora = adapted(tiny_dir)
    base = engine.load_model(tiny_dir, "cpu")[0].eval()
    policy = logprobs(model)
    reference = engine.WithoutAdapters(lora)
    assert torch.allclose(logprobs(reference), logprobs(base), atol=1e-6)
    assert (policy - logprobs(base)).abs().max() > 1e-3          # the adapters do change the policy
    assert torch.equal(logprobs(model), policy)                  # and are back on after the reference pass


def test_merged_weights_are_the_adapted_model(tiny_dir):
    model, _, lora = adapted(tiny_dir)
    plain = engine.load_model(tiny_dir, "cpu")[0].eval()
    state = engine.merged_weights(lora)
    assert not [k for k in state if "lora" in k or "base_layer" in k]
    plain.load_state_dict(state)
    assert torch.allclose(logprobs(plain), logprobs(model), atol=1e-5)


def test_sampling_goes_through_the_adapters(tiny_dir):
    model, tokenizer, lora = adapted(tiny_dir)
    prompt = IDS[:, :4]
    for decoder in ("static", "hf"):
        eng = engine.Engine(model, tokenizer, grpo.DEFINITION, decoder=decoder)
        out = eng.sample(prompt, torch.ones_like(prompt), 6, uniforms=torch.rand(2, 6))
        tokens, sampler_logp = out.tokens, out.logp
        full = torch.cat([prompt, tokens], 1)
        mask = engine.completion_mask(tokens, eng.eos_ids)
        trainer_logp = grpo.completion_logprobs(model, full, torch.ones_like(full), 6,
                                                  with_entropy=False)[0]
        assert torch.allclose(sampler_logp * mask, trainer_logp.detach() * mask, atol=1e-5), decoder


LORA = FAST + ["--lora_rank=4", "--lora_alpha=16", "--beta=0.04", "--lr=3e-3", "--warmup_steps=0",
               "--min_lr_ratio=1.0", "--micro_batch_size=5"]


@pytest.mark.slow
def test_a_lora_run_saves_the_adapter_and_a_merged_model(tmp_path):
    run = tmp_path / "run"
    grpo.train(grpo.parse_config(LORA + ["--max_steps=3", "--save_every=2", f"--out_dir={run}"]))
    rows = metrics(run)
    assert all(r["grad_norm"] > 0 for r in rows) and rows[-1]["kl"] > 0
    assert all(r["mismatch_abs"] < 1e-4 for r in rows)  # the sampler saw the adapters the trainer trains
    adapter = run / "checkpoint-000003" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    merged = load_file(run / "model.safetensors")
    assert not [k for k in merged if "lora" in k]
    from transformers import AutoModelForCausalLM
    # the run directory, plain transformers
    plain = AutoModelForCausalLM.from_pretrained(run).eval()
    base = AutoModelForCausalLM.from_pretrained(run / "cold_start")
    with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert torch.allclose(logprobs(plain), logprobs(with_adapter), atol=1e-5)
    start = engine.load_model(str(run / "cold_start"), "cpu")[0].eval()
    assert (logprobs(plain) - logprobs(start)).abs().max() > 1e-4         # the adapters trained


@pytest.mark.slow
def test_a_resumed_lora_run_reproduces_the_uninterrupted_one(tmp_path):
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    grpo.train(grpo.parse_config(LORA + ["--max_steps=4", "--save_every=2", f"--out_dir={whole}"]))
    grpo.train(grpo.parse_config(LORA + ["--max_steps=2", "--save_every=2", f"--out_dir={part}"]))
    grpo.train(grpo.parse_config([f"--resume={part}", "--max_steps=4"]))
    assert without_timings(metrics(whole)) == without_timings(metrics(part))
    a, b = (load_file(os.path.join(whole, "model.safetensors")),
            load_file(os.path.join(part, "model.safetensors")))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, message", [
    (["--lora_rank=4", "--ref_sync_every=2"], "ref_sync_every: with LoRA the reference is the base model"),
    (["--lora_rank=4", "--lora_dropout=0.1"], "lora_dropout: dropout needs disable_dropout=False"),
    (["--lora_rank=4", "--sharding=fsdp"], "lora_rank: LoRA runs with sharding=ddp"),
    (["--lora_rank=4", "--lora_alpha=0"], "lora_alpha: must be positive"),
])
def test_lora_misuse_is_refused_before_anything_loads(args, message):
    with pytest.raises(grpo.ConfigError, match=message):
        grpo.parse_config(args)


def test_target_modules_that_match_nothing_stop_in_one_line(tmp_path, capsys):
    code = grpo.main(["--lora_rank=4", "--lora_target_modules=no_such_proj", "--sft_steps=0", "--eval_size=0",
                      f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert (code == 2 and err[-1].startswith("grpo.py: error: lora_target_modules:")
            and "no_such_proj" in err[-1])


def test_without_peft_lora_stops_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runs, "installed", lambda package: package != "peft")
    code = grpo.main(["--lora_rank=4", f"--out_dir={tmp_path}"])
    assert code == 2 and capsys.readouterr().err.strip() == (
        "grpo.py: error: lora_rank: LoRA needs the peft package (pip install peft)")
    assert not os.listdir(tmp_path)
    # and the engine's own guard, for callers that skip validation
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(grpo.ConfigError, match="LoRA needs the peft package"):
        engine.add_lora(torch.nn.Linear(2, 2), engine.LoraOptions(4, 8.0))


@pytest.mark.slow
def test_a_bf16_base_under_fp32_adapters(tmp_path, monkeypatch):
    """dtype=bfloat16 with LoRA: the frozen base loads in bf16 (it never takes an AdamW step), the
    adapters stay fp32 and train, and the merged model saves and loads."""
    seen = {}
    real = engine.add_lora

    def spy(model, *args):
        lora = real(model, *args)
        seen.update({n: p.dtype for n, p in model.named_parameters()})
        return lora
    monkeypatch.setattr(grpo, "add_lora", spy)
    run = tmp_path / "run"
    grpo.train(grpo.parse_config(LORA + ["--sft_steps=0", "--dtype=bfloat16", "--max_steps=2",
                                         f"--out_dir={run}"]))
    assert {d for n, d in seen.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in seen.items() if "lora_" not in n} == {torch.bfloat16}
    assert all(r["grad_norm"] > 0 for r in metrics(run))
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(run)
    base = AutoModelForCausalLM.from_pretrained(run / "tiny")
    assert any((a.float() - b.float()).abs().max() > 0 for a, b in zip(plain.parameters(), base.parameters()))
