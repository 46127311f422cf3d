"""The engine's static-cache decoder: the same tokens as transformers' path and model.generate for
each family it runs, its own log-probs equal to a full pass, the current weights after an update,
and a one-line refusal or a fallback where it cannot run."""
import copy

import pytest
import torch

import engine
import grpo
import objectives
from conftest import drawn
from test_families import build, group_prompts

FAST = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny[1]


def both_paths(model, ids, mask, *how):
    """Transformers' path and the static decoder, sampling 12 tokens as engine.Sampling(12, *how)."""
    how = engine.Sampling(12, *how)
    how = drawn(ids, how)
    static = engine.StaticDecoder(model, grpo.DEFINITION).sample(ids, mask, how)
    return grpo.sample(model, ids, mask, how), static


@pytest.mark.parametrize("name", FAST)
def test_static_decoding_equals_transformers_and_generate(name, tokenizer):
    model = build(name, tokenizer)
    ids, mask = group_prompts(tokenizer)  # left-padded, mixed lengths, groups of repeated prompts
    eos = torch.tensor([tokenizer.eos_token_id])
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)[:, ids.size(1):]
    for share in (True, False):
        hf, static = both_paths(model, ids, mask, eos, tokenizer.pad_token_id, 0.0, 1.0, None, share)
        assert torch.equal(static[0], hf[0]) and torch.equal(static[0], theirs[:, :static[0].size(1)])
    u = torch.rand(len(ids), 12, generator=torch.Generator().manual_seed(0))
    hf, static = both_paths(model, ids, mask, eos, tokenizer.pad_token_id, 1.0, 1.0, u)
    assert torch.equal(static[0], hf[0])                          # the same uniforms pick the same tokens
    assert torch.allclose(static[1], hf[1], atol=1e-5) and torch.allclose(static[2], hf[2], atol=1e-5)
    full = torch.cat([ids, static[0]], 1)                          # the sampler's log-probs are the model's
    attention = torch.cat([mask, torch.ones_like(static[0])], 1)
    with torch.no_grad():
        logp, _ = grpo.completion_logprobs(model, full, attention, static[0].size(1))
    assert torch.allclose(static[1], logp, atol=1e-4)


def test_stops_at_any_stop_id_with_pad_equal_to_eos_and_rows_that_end_at_once_or_never(tokenizer):
    model = build("qwen2", tokenizer)
    ids, mask = group_prompts(tokenizer)
    first = grpo.sample(model, ids, mask,
                          engine.Sampling(1, torch.tensor([tokenizer.eos_token_id]), 0, 0.0))[0][:, 0]
    stops = torch.tensor(sorted({tokenizer.eos_token_id, int(first[0])}))  # row 0 ends at its first token
    hf, static = both_paths(model, ids, mask, stops, tokenizer.eos_token_id, 0.0, 1.0)  # pad is an EOS id
    assert torch.equal(static[0], hf[0])
    assert static[0][0, 0] == first[0] and (static[0][0, 1:] == tokenizer.eos_token_id).all()
    never = torch.tensor([len(tokenizer) + 5])                     # no row ever ends: all run the full length
    hf, static = both_paths(model, ids, mask, never, tokenizer.pad_token_id, 0.0, 1.0)
    assert static[0].shape == (len(ids), 12) and torch.equal(static[0], hf[0])


def test_after_an_update_the_static_path_samples_the_new_weights(tiny):
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    sampler = engine.Engine(model, tokenizer, grpo.DEFINITION, decoder="static")
    ids, mask = group_prompts(tokenizer)
    u = torch.rand(len(ids), 12, generator=torch.Generator().manual_seed(1))
    before = sampler.sample(ids, mask, 12, 1.0, 1.0, u).tokens
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    logp, _ = grpo.completion_logprobs(model, torch.cat([ids, before], 1),
                                         torch.cat([mask, torch.ones_like(before)], 1), before.size(1))
    (-logp.sum()).backward()
    optimizer.step()
    after = sampler.sample(ids, mask, 12, 1.0, 1.0, u).tokens
    reference = grpo.sample(model, ids, mask,
                              engine.Sampling(12, sampler.eos_ids, sampler.pad_id, 1.0, 1.0, u)).tokens
    assert torch.equal(after, reference) and not torch.equal(after, before)


@pytest.mark.parametrize("name, why", [("lfm2", "lfm2 is not one of"), ("gpt2", "gpt2 is not one of")])
def test_other_families_fall_back_or_are_refused_in_one_line(name, why, tokenizer):
    model = build(name, tokenizer)
    assert engine.Engine(model, tokenizer, grpo.DEFINITION, decoder="auto").decoder is None
    with pytest.raises(grpo.ConfigError, match=f"decoder: static decoding cannot run this model: {why}"):
        engine.Engine(model, tokenizer, grpo.DEFINITION, decoder="static")


def test_a_sliding_window_shorter_than_the_sequence_takes_transformers_path(tokenizer):
    import transformers
    config = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=len(tokenizer), sliding_window=8,
                                        pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    sampler = engine.Engine(model, tokenizer, grpo.DEFINITION, decoder="auto")
    assert sampler.decoder is not None and not sampler.uses_static(20) and sampler.uses_static(8)


def test_truncated_importance_weights_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-1.0, -3.0, -0.1]])
    # exp(0), exp(1) capped at 2, exp(-0.4)
    expected = torch.tensor([[1.0, min(2.0, 2.718281828), 0.670320046]])
    assert torch.allclose(objectives.truncated_is_weight(old, sampler, 2.0), expected)
    logp = old.clone().requires_grad_()
    batch = grpo.Rollout(None, None, torch.tensor([2.0]), torch.ones(1, 3), old, None, sampler)
    objective = grpo.Config(clip_eps_high=0.2, beta=0.0, loss_type="dapo", tis_cap=2.0)
    loss, _ = grpo.grpo_loss(logp, batch, torch.tensor(3.0), objective)
    assert torch.isclose(loss, -(2.0 * expected).sum() / 3)        # ratio 1: each token's -A, weighted


@pytest.mark.slow
def test_the_compiled_decode_step_gives_the_same_tokens(tokenizer):
    """torch.compile of the decode step (on CPU: inductor; on CUDA it adds CUDA graphs): the same
    tokens and log-probs as the eager step, one compilation per prompt bucket and batch."""
    model = build("qwen2", tokenizer)
    ids, mask = group_prompts(tokenizer)
    eos = torch.tensor([tokenizer.eos_token_id])
    u = torch.rand(len(ids), 12, generator=torch.Generator().manual_seed(3))
    how = engine.Sampling(12, eos, tokenizer.pad_token_id, 1.0, 1.0, u)
    eager = engine.StaticDecoder(model, grpo.DEFINITION, bucket=16).sample(ids, mask, how)
    compiled = engine.StaticDecoder(model, grpo.DEFINITION, compile=True, bucket=16).sample(ids, mask, how)
    assert torch.equal(compiled[0], eager[0]) and torch.allclose(compiled[1], eager[1], atol=1e-5)
