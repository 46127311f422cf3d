"""Model families, each a tiny random model built from its transformers config: the sampler and
the log-probs are exact on every one, hybrid models (convolution or linear-attention layers)
included, and a training step runs."""

import pytest
import torch
import transformers
from packaging.version import Version

import data
import engine
import grpo
import lmhead
from conftest import draw
from grpo import Config


def attention_family(name, **extra):
    def build(common):
        return getattr(transformers, name)(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, **common, **extra)
    return build


FAMILIES = {
    "llama": attention_family("LlamaConfig"),
    "qwen2": attention_family("Qwen2Config"),
    "qwen3": attention_family("Qwen3Config", head_dim=16),
    "mistral": attention_family("MistralConfig"),
    # windows shorter than a sequence
    "gemma2": attention_family("Gemma2Config", head_dim=16, sliding_window=8),
    "gemma3": attention_family("Gemma3TextConfig", head_dim=16, sliding_window=8),
    "gpt2": lambda common: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4,
                                                   n_positions=common.pop("max_position_embeddings"),
                                                   **common),
    "phi3": attention_family("Phi3Config"),
    # hybrids: their caches hold running states, not keys and values by row
    "lfm2": attention_family("Lfm2Config", layer_types=["conv", "full_attention"]),
    "qwen3_next": attention_family("Qwen3NextConfig", head_dim=16,
                                   layer_types=["linear_attention", "full_attention"],
                                   linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16,
                                   linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "falcon_h1": attention_family("FalconH1Config", mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                                  mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16),
}
HYBRIDS = {"lfm2", "qwen3_next", "falcon_h1"}
# added, or able to build their own cache, in these versions
NEWER = {"qwen3_next": "4.57", "falcon_h1": "5.0"}


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny[1]


def build(name, tokenizer):
    if name in NEWER and Version(transformers.__version__) < Version(NEWER[name]):
        pytest.skip(f"{name} needs transformers >= {NEWER[name]}")
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(FAMILIES[name](common)).eval()


def group_prompts(tokenizer):
    """Left-padded prompts of mixed lengths where consecutive rows repeat a prompt, as a step's groups do."""
    questions = ["12+34", "12+34", "5+6", "5+6", "5+6", "99+1"]
    cfg = Config(template="plain", max_prompt_tokens=100)
    return data.encode_prompts(tokenizer, [{"question": q} for q in questions], cfg, "cpu")[:2]


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_sampling_equals_generate(name, tokenizer):
    model = build(name, tokenizer)
    assert grpo.can_share_prompts(model) == (name not in HYBRIDS)
    ids, mask = group_prompts(tokenizer)
    eos = torch.tensor([tokenizer.eos_token_id])
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)[:, ids.size(1):]
    for share in (False, True):
        ours = draw(model, ids, mask, 12, eos, tokenizer.pad_token_id, temperature=0, share_prompt=share)
        assert torch.equal(ours, theirs[:, :ours.size(1)])
    # sampled: sharing changes nothing
    u = torch.rand(len(ids), 12, generator=torch.Generator().manual_seed(0))
    shared = draw(model, ids, mask, 12, eos, tokenizer.pad_token_id, 1.0, 1.0, u, share_prompt=True)
    assert torch.equal(shared, draw(model, ids, mask, 12, eos, tokenizer.pad_token_id, 1.0, 1.0, u,
                                    share_prompt=False))


@pytest.mark.parametrize("name", FAMILIES)
def test_logprobs_equal_a_full_unpadded_pass(name, tokenizer):
    model = build(name, tokenizer)
    ids, mask = group_prompts(tokenizer)
    completion = torch.randint(7, 40, (len(ids), 6), generator=torch.Generator().manual_seed(1))
    full, attention = torch.cat([ids, completion], 1), torch.cat([mask, torch.ones_like(completion)], 1)
    with torch.no_grad():
        expected = []
        for r in range(len(ids)):  # each row alone: no padding, every position's full log-softmax
            alone = torch.cat([ids[r][mask[r].bool()], completion[r]])[None]
            logits = model(alone).logits[0, -completion.size(1) - 1:-1]
            expected.append(torch.log_softmax(logits, -1).gather(-1, completion[r][:, None]).squeeze(-1))
        for share in (False, True):
            logp, _ = grpo.completion_logprobs(model, full, attention, completion.size(1),
                                                 share_prompt=share)
            assert torch.allclose(logp, torch.stack(expected), atol=1e-4), share


@pytest.mark.parametrize("name", FAMILIES)
def test_one_training_step_runs(name, tokenizer):
    model = build(name, tokenizer)
    ids, mask = group_prompts(tokenizer)
    eos = torch.tensor([tokenizer.eos_token_id])
    completion = draw(model, ids, mask, 8, eos, tokenizer.pad_token_id)
    full, attention = torch.cat([ids, completion], 1), torch.cat([mask, torch.ones_like(completion)], 1)
    loss_mask = engine.completion_mask(completion, eos)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    cfg = Config(micro_batch_size=4, clip_eps_high=0.2, beta=0.0)
    rollout = grpo.Rollout(full, attention, torch.randn(len(ids)), loss_mask, None, None,
                           torch.zeros_like(loss_mask))
    stats = grpo.accumulate_gradients(model, rollout, cfg)
    assert torch.isfinite(stats["loss"])
    optimizer.step()
    moved = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert sum(moved) > len(moved) // 2


@pytest.mark.parametrize("name", FAMILIES)
def test_chunked_head_equals_the_definition(name, tokenizer, monkeypatch):
    """lmhead.logprobs: grpo.completion_logprobs' log-probs, entropies and gradients (a chunk
    of 4 positions at a time), with the prompt shared and not; families whose logits are more than
    hidden @ W^T (Gemma 2's softcap) keep the definition's path."""
    model = build(name, tokenizer)
    if name == "gemma2":
        assert lmhead.plain_head(model) is None
        return
    assert lmhead.plain_head(model) is model.get_output_embeddings()
    monkeypatch.setattr(lmhead, "CHUNK_LOGITS", 4 * len(tokenizer))
    ids, mask = group_prompts(tokenizer)
    completion = torch.randint(7, 40, (len(ids), 6), generator=torch.Generator().manual_seed(1))
    full, attention = torch.cat([ids, completion], 1), torch.cat([mask, torch.ones_like(completion)], 1)
    weights = torch.randn(2, len(ids), completion.size(1), generator=torch.Generator().manual_seed(2))

    def values_and_grads(forward, share):
        model.zero_grad()
        logp, entropy = forward(share)
        ((logp * weights[0]).sum() + (entropy * weights[1]).sum()).backward()
        return [logp.detach(), entropy.detach()] + [p.grad.clone() for p in model.parameters()
                                                    if p.grad is not None]
    for share in (False, True):
        theirs = values_and_grads(lambda share: grpo.completion_logprobs(
            model, full, attention, completion.size(1), 0.7, share), share)
        cfg = Config(temperature=0.7, share_prompt=share)
        ours = values_and_grads(lambda share: lmhead.logprobs(
            model, full, attention, completion.size(1), cfg, True, grpo.prefill_prompts), share)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (share, (a - b).abs().max())
