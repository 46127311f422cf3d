"""lmhead.py: the completion log-probs a chunk of positions at a time. Equal to the definition on every
family (tests/test_families.py); here: what it keeps for backward, its check of the head, when
grpo.logprobs takes it, bf16, and a whole run that trains as the definition's does."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

import grpo
import lmhead
from configurator import ConfigError
from conftest import ROOT
from test_train import FAST, metrics


PLAIN = grpo.Config(temperature=1.0, share_prompt=False)  # every row whole, as the definition's default


def llama(vocab, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=None)
    return transformers.AutoModelForCausalLM.from_config(config)


def batch(vocab, rows=4, prompt=5, completion=7):
    ids = torch.randint(3, vocab, (rows, prompt + completion), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[0, :2] = 0  # a left-padded prompt
    return ids, attention, completion


def values_and_grads(model, forward):
    """forward()'s log-probs and entropies, and the gradients of their sum on every trained parameter."""
    model.zero_grad()
    logp, entropy = forward()
    (logp.sum() + entropy.sum()).backward()
    return [logp.detach(), entropy.detach()] + [p.grad.clone() for p in model.parameters()
                                                if p.grad is not None]


def saved_sizes(model, run):
    """The sizes (numel) of the tensors autograd keeps for backward while run() computes, the model's
    parameters left out."""
    sizes, weights = [], {p.data_ptr() for p in model.parameters()}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            sizes.append(tensor.numel())
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sizes


def test_backward_keeps_no_tensor_of_every_logit(monkeypatch):
    """The property that bounds memory: the definition keeps tensors of B x C x V logits for backward;
    the chunked path keeps nothing that large (its largest: the hidden states, or one chunk)."""
    V = 3000
    model, (ids, attention, C) = llama(V), batch(V)
    monkeypatch.setattr(lmhead, "CHUNK_LOGITS", 2 * V)
    every_logit = len(ids) * C * V
    plain = saved_sizes(model, lambda: grpo.completion_logprobs(model, ids, attention, C))
    chunked = saved_sizes(model, lambda: lmhead.logprobs(model, ids, attention, C, PLAIN, True, None))
    assert max(plain) >= every_logit
    assert max(chunked) < every_logit / 10


def test_a_head_with_something_after_it_is_refused_in_one_line():
    """A family whose logits are not its head's output alone (here Gemma 2's softcap, which
    plain_head already declines) is caught by the check on the last position, not trained wrongly."""
    config = transformers.Gemma2Config(vocab_size=50, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=16, max_position_embeddings=64, final_logit_softcapping=0.5)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert lmhead.plain_head(model) is None
    ids, attention, C = batch(50)
    with pytest.raises(ConfigError, match="chunked_head: Gemma2ForCausalLM's logits are not its LM head's"):
        lmhead.head_input(model, model.get_output_embeddings(), input_ids=ids, attention_mask=attention,
                          logits_to_keep=C + 1)


def test_when_grpo_takes_the_chunked_path():
    demo = grpo.Config()  # the tiny demo: 64 rows x 32 tokens x 110 logits, far below a chunk
    tiny_vocab, qwen_vocab = llama(110), llama(151_936)
    assert not lmhead.matters(tiny_vocab, demo)
    assert lmhead.matters(qwen_vocab, demo)
    assert not lmhead.matters(qwen_vocab, grpo.Config(chunked_head=False))
    assert not lmhead.matters(qwen_vocab, grpo.Config(compile=True))
    assert not lmhead.matters(qwen_vocab, grpo.Config(micro_batch_size=1, max_new_tokens=100))  # 15M logits


def test_bf16_autocast_matches_the_definition():
    """Under bf16 autocast the chunk's matmul runs in bf16 as the model's own head does."""
    V = 300
    model, (ids, attention, C) = llama(V), batch(V)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = grpo.completion_logprobs(model, ids, attention, C)
        ours = lmhead.logprobs(model, ids, attention, C, PLAIN, True, None)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_one_completion_token():
    V = 200
    model, (ids, attention, _) = llama(V), batch(V)
    theirs = grpo.completion_logprobs(model, ids, attention, 1, share_prompt=True)
    ours = lmhead.logprobs(model, ids, attention, 1, grpo.Config(), True, grpo.prefill_prompts)
    assert ours[0].shape == (len(ids), 1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, theirs))


@pytest.mark.slow
def test_a_run_trains_as_the_definitions_does(tmp_path, monkeypatch):
    """Three GRPO steps (KL, mu = 2, the entropy bonus: every pass grpo.logprobs makes) with the
    chunked path on every pass and with the definition's: the same samples, rewards and counts, and
    losses, KL and gradient norms within 1e-5."""
    common = FAST + ["--max_steps=3", "--num_iterations=2", "--beta=0.04", "--entropy_coef=0.01"]
    plain, chunked = str(tmp_path / "plain"), str(tmp_path / "chunked")
    grpo.train(grpo.parse_config(common + [f"--out_dir={plain}"]))
    calls = []
    real = lmhead.logprobs

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(lmhead, "CHUNK_LOGITS", 50)
    monkeypatch.setattr(lmhead, "logprobs", counted)
    grpo.train(grpo.parse_config(common + [f"--out_dir={chunked}"]))
    assert len(calls) >= 3 * 4  # each step: old and reference passes, two updates
    for a, b in zip(metrics(plain), metrics(chunked)):
        for key, value in a.items():
            if key.startswith("t_") or key == "tokens_per_sec":
                continue
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
            else:
                assert b[key] == value, key
    with open(os.path.join(chunked, "train_config.json")) as f:
        assert json.load(f)["chunked_head"] is True


@pytest.mark.slow
def test_the_memory_bench_runs_and_the_paths_agree(tmp_path):
    """bench/logprob_memory.py at a small shape (1 x 128 positions, just past one chunk): both sides
    measured, their values and gradients the same to 1e-5 (memory is the bench's figure, not asserted)."""
    output = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "logprob_memory.py"), "--rows=1",
                           "--completion=128", f"--out={tmp_path / 'values'}", f"--output={output}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(output.read_text())
    assert result["plain"]["peak_mib"] > 0 and result["chunked"]["peak_mib"] > 0
    assert all(diff <= 1e-5 for diff in result["max_abs_diff"].values())
    assert not list(tmp_path.glob("values*"))  # the compared values are removed


def test_gradient_checkpointing_runs_every_row_and_matches():
    """Under gradient checkpointing (no cache) the prompt is not shared, in either path; the same
    values and gradients."""
    V = 300
    model, (ids, attention, C) = llama(V), batch(V)
    model.gradient_checkpointing_enable()
    model.train()
    theirs = values_and_grads(model, lambda: grpo.completion_logprobs(model, ids, attention, C, 0.9, True))
    cfg = grpo.Config(temperature=0.9, share_prompt=True)
    ours = values_and_grads(model, lambda: lmhead.logprobs(model, ids, attention, C, cfg, True,
                                                           grpo.prefill_prompts))
    assert len(ours) == len(theirs) == 2 + len(list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs))


def test_lora_adapters_train_through_the_chunked_head(monkeypatch):
    """With LoRA's adapters on every linear layer but the head, the head stays a plain matmul: the
    same log-probs, entropies and adapter gradients as the definition."""
    pytest.importorskip("peft")
    import engine
    V = 300
    model, (ids, attention, C) = llama(V), batch(V)
    engine.add_lora(model, engine.LoraOptions(4, 8.0))
    assert lmhead.plain_head(model) is model.get_output_embeddings()
    monkeypatch.setattr(lmhead, "CHUNK_LOGITS", 2 * V)
    theirs = values_and_grads(model, lambda: grpo.completion_logprobs(model, ids, attention, C, 0.9, True))
    cfg = grpo.Config(temperature=0.9, share_prompt=True)
    ours = values_and_grads(model, lambda: lmhead.logprobs(model, ids, attention, C, cfg, True,
                                                           grpo.prefill_prompts))
    assert len(ours) == len(theirs) > 2
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs))
