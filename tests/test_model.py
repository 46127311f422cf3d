"""Sampling, log-probs and the gradient, on the tiny Llama built locally."""
import copy
import math
import types

import pytest
import torch

import data
import engine
import grpo
from conftest import draw
from grpo import Config


def prompts(tokenizer, questions, limit=1000):
    """Left-padded ids and mask of the plain-template prompts `question + "\n"`."""
    cfg = Config(template="plain", max_prompt_tokens=limit)
    return data.encode_prompts(tokenizer, [{"question": q} for q in questions], cfg, "cpu")[:2]


def test_tiny_model_reloads_and_tokenizes_tags_whole(tiny_dir, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tokenizer = tiny
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    ids = tokenizer("<think>1+2</think>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5 and tokenizer.decode(ids) == "<think>1+2</think>"
    assert (AutoModelForCausalLM.from_pretrained(tiny_dir) is not None
            and AutoTokenizer.from_pretrained(tiny_dir).eos_token == "<eos>")


def test_logprobs_match_full_log_softmax_and_ignore_left_padding(tiny):
    model, tokenizer = tiny
    ids, mask = prompts(tokenizer, ["12+34", "1+2"])          # the second is left-padded
    completion = data.encode_completions(tokenizer, ["<think>4+2=6</think>", "<think>x"], "cpu")
    full_ids, attention = torch.cat([ids, completion], 1), torch.cat([mask, torch.ones_like(completion)], 1)
    with torch.no_grad():
        logp, entropy = grpo.completion_logprobs(model, full_ids, attention, completion.size(1),
                                                   temperature=0.7)
        # reference: the second row alone, no padding, full log-softmax over every position
        alone = torch.cat([prompts(tokenizer, ["1+2"])[0], completion[1:]], 1)
        logits = model(alone).logits[0, -completion.size(1) - 1:-1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, completion[1][:, None]).squeeze(-1)
        probs = torch.softmax(logits, -1)
    assert torch.allclose(logp[1], expected, atol=1e-5)
    assert torch.allclose(entropy[1], -(probs * probs.log()).sum(-1), atol=1e-5)


def test_greedy_sampling_matches_transformers_generate(tiny):
    model, tokenizer = tiny
    ids, mask = prompts(tokenizer, ["12+34", "5+6", "99+1"])
    eos = engine.stop_ids(model, tokenizer)
    ours = draw(model, ids, mask, 12, eos, tokenizer.pad_token_id, temperature=0)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)[:, ids.size(1):]
    assert torch.equal(ours, theirs[:, :ours.size(1)])


class Scripted(torch.nn.Module):
    """A stand-in model that emits row r's script token by token (then 9s), with a KV-cache argument."""

    def __init__(self, scripts, vocab=12):
        super().__init__()
        self.scripts, self.vocab, self.calls = scripts, vocab, 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):
        step, self.calls = self.calls, self.calls + 1
        logits = torch.full((len(input_ids), 1, self.vocab), -1e9)
        for r, script in enumerate(self.scripts):
            logits[r, 0, script[step] if step < len(script) else 9] = 0
        return types.SimpleNamespace(logits=logits, cache=())  # a stand-in cache, passed back and ignored


@pytest.mark.parametrize("pad_id", [0, 2])   # 2 == EOS: pad equal to EOS
def test_sampling_pads_after_eos_and_stops_early(pad_id):
    eos = torch.tensor([2])
    model = Scripted([[5, 2, 7, 7], [5, 6, 2, 7], [2, 7, 7, 7], [5, 6, 7, 2]])
    distinct_prompts = torch.arange(12).view(4, 3)  # identical ones would share one prefill row
    out = draw(model, distinct_prompts, torch.ones(4, 3, dtype=torch.long), 20, eos, pad_id)
    p = pad_id
    assert out[:, :4].tolist() == [[5, 2, p, p], [5, 6, 2, p], [2, p, p, p], [5, 6, 7, 2]]
    assert (out[:, 4:] == p).all()
    # stopped at the first check (every 8 tokens) after every row's EOS
    assert model.calls == out.size(1) == 8
    assert engine.completion_mask(out, eos).sum(1).tolist() == [2, 3, 1, 4]


def test_sampling_without_eos_runs_to_max_new_tokens():
    out = draw(Scripted([[5] * 50]), torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long),
                      7, torch.tensor([2]), 0)
    assert out.shape == (1, 7) and engine.completion_mask(out, torch.tensor([2])).sum() == 7


def test_top_p_keeps_the_nucleus():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    u = torch.rand(2000)
    picks = grpo.pick_token(logits, 1.0, 0.7, u)      # nucleus {0, 1}: cumulative 0.5 < 0.7 <= 0.8
    assert set(picks.tolist()) == {0, 1} and abs((picks == 0).float().mean() - 0.625) < 0.05
    assert set(grpo.pick_token(logits, 1.0, 0.1, u).tolist()) == {0}
    assert set(grpo.pick_token(logits, 0, 1.0, u).tolist()) == {0}
    all_four = grpo.pick_token(logits, 1.0, 1.0, u)
    assert set(all_four.tolist()) == {0, 1, 2, 3}
    assert abs((all_four == 3).float().mean() - 0.05) < 0.02


def test_inverse_cdf_picks_the_interval_holding_the_uniform():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(7, 1)
    u = torch.tensor([0.0, 0.49, 0.5, 0.79, 0.81, 0.96, 0.999999])  # cumulative 0.5, 0.8, 0.95, 1.0
    assert grpo.pick_token(logits, 1.0, 1.0, u).tolist() == [0, 0, 1, 1, 2, 3, 3]
    # probability 0 is never picked
    zero_first = torch.tensor([[-math.inf, 0.0, 0.0, -math.inf]]).repeat(3, 1)
    assert grpo.pick_token(zero_first, 1.0, 1.0, torch.tensor([0.0, 0.5, 0.9999999])).tolist() == [1, 2, 2]


def test_a_completion_does_not_depend_on_its_batch(tiny):
    """The property that lets ranks split a step: each row's tokens come from its own uniforms."""
    model, tokenizer = tiny
    eos = engine.stop_ids(model, tokenizer)
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]] * 6)
    mask, u = torch.ones_like(ids), torch.rand(6, 16, generator=torch.Generator().manual_seed(3))
    together = draw(model, ids, mask, 16, eos, tokenizer.pad_token_id, 1.0, 1.0, u)
    halves = [draw(model, ids[r], mask[r], 16, eos, tokenizer.pad_token_id, 1.0, 1.0, u[r])
              for r in (slice(0, 3), slice(3, 6))]
    width = max(together.size(1), *(h.size(1) for h in halves))
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.size(1)),  # noqa: E731
                                            value=tokenizer.pad_token_id)
    assert torch.equal(pad(together), torch.cat([pad(h) for h in halves]))
    assert len({tuple(row) for row in together.tolist()}) > 1  # the rows really were sampled


def grouped_batch(tokenizer, group_sizes=(3, 1, 4), completion_len=6, seed=0):
    """Rows of prompt + random completion in which consecutive rows share a prompt, as a step's
    groups do; the prompts have different lengths (left padding)."""
    questions = [q for g, q in zip(group_sizes, ["12+34", "1+2", "5+60", "7+7"]) for _ in range(g)]
    ids, mask = prompts(tokenizer, questions)
    completion = torch.randint(7, 40, (len(questions), completion_len),
                               generator=torch.Generator().manual_seed(seed))
    return torch.cat([ids, completion], 1), torch.cat([mask, torch.ones_like(completion)], 1), completion_len


@pytest.mark.parametrize("completion_len", [1, 6])
def test_shared_prompt_pass_gives_the_same_logprobs_and_gradients(tiny, completion_len):
    """A group's rows share one forward pass over their prompt: same log-probs, entropies and
    gradients as the full-sequence pass, also when a micro-batch cuts a group (rows 2..5)."""
    model, tokenizer = tiny
    ids, attention, C = grouped_batch(tokenizer, completion_len=completion_len)
    results = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        logp, entropy = grpo.completion_logprobs(model, ids, attention, C, 0.7, share_prompt=share)
        cut, _ = grpo.completion_logprobs(model, ids[2:6], attention[2:6], C, 0.7, share_prompt=share)
        (logp * torch.arange(1.0, C + 1)).sum().backward()
        results[share] = logp.detach(), entropy, cut.detach(), [p.grad.clone() for p in model.parameters()]
    (logp0, ent0, cut0, grads0), (logp1, ent1, cut1, grads1) = results[False], results[True]
    assert torch.allclose(logp0, logp1, atol=1e-5) and torch.allclose(ent0, ent1, atol=1e-5)
    assert torch.allclose(cut0, logp0[2:6], atol=1e-5) and torch.allclose(cut1, logp1[2:6], atol=1e-5)
    for g0, g1 in zip(grads0, grads1):  # fp32 rounding differs between the two passes: compare norms
        assert (g0 - g1).norm() <= 1e-5 * g0.norm()
    assert sum(g.abs().sum() for g in grads1) > 0


def test_shared_prompt_pass_runs_each_distinct_prompt_once(tiny):
    model, tokenizer = tiny
    ids, attention, C = grouped_batch(tokenizer)      # 8 rows, 3 distinct prompts
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(
        lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            grpo.completion_logprobs(model, ids, attention, C, share_prompt=True)
            grpo.completion_logprobs(model, ids, attention, C)
    finally:
        handle.remove()
    prompt_len = ids.size(1) - C
    assert seen == [(3, prompt_len), (8, C), (8, ids.size(1))]


def test_gradient_checkpointing_falls_back_to_the_full_pass(tiny):
    """Under gradient checkpointing transformers keeps no KV cache; the shared pass must not be used."""
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    ids, attention, C = grouped_batch(tokenizer)
    expected, _ = grpo.completion_logprobs(model, ids, attention, C, share_prompt=False)
    model.gradient_checkpointing_enable()
    model.train()
    got, _ = grpo.completion_logprobs(model, ids, attention, C, share_prompt=True)
    assert torch.allclose(expected, got, atol=1e-5)


def test_sampling_repeated_prompts_equals_sampling_them_one_by_one(tiny):
    """Sampling prefills each distinct prompt once; the completions are those of separate passes."""
    model, tokenizer = tiny
    ids, attention, _ = grouped_batch(tokenizer)
    prompt_ids, prompt_mask = ids[:, :-6], attention[:, :-6]
    eos, u = (engine.stop_ids(model, tokenizer),
              torch.rand(len(ids), 12, generator=torch.Generator().manual_seed(5)))
    together = draw(model, prompt_ids, prompt_mask, 12, eos, tokenizer.pad_token_id, 1.0, 1.0, u)
    unshared = draw(model, prompt_ids, prompt_mask, 12, eos, tokenizer.pad_token_id, 1.0, 1.0, u,
                    share_prompt=False)
    assert torch.equal(together, unshared)
    for r in range(len(ids)):
        alone = draw(model, prompt_ids[r:r + 1], prompt_mask[r:r + 1], 12, eos, tokenizer.pad_token_id,
                     1.0, 1.0, u[r:r + 1])
        assert together[r, :alone.size(1)].tolist() == alone[0].tolist()
        assert (together[r, alone.size(1):] == tokenizer.pad_token_id).all()


def batch_for_gradients(tokenizer, n=7):
    torch.manual_seed(1)
    ids, mask = prompts(tokenizer, [f"{10 + i}+{3 * i}\n" * (i % 3) + f"{i}+1" for i in range(n)])
    completion = torch.randint(7, 40, (n, 9))
    for r in range(n):                      # EOS at different places; row 0 has none
        if r:
            completion[r, r + 1:] = tokenizer.eos_token_id
    full_ids = torch.cat([ids, completion], 1)
    attention = torch.cat([mask, torch.ones_like(completion)], 1)
    loss_mask = engine.completion_mask(completion, torch.tensor([tokenizer.eos_token_id]))
    loss_mask[3] = 0                        # a completion left out (e.g. a dropped group)
    return full_ids, attention, completion.size(1), torch.randn(n), loss_mask


def gradient(model, tokenizer, batch, cfg, old=None, ref=None):
    model.zero_grad()
    ids, attention, c, adv, loss_mask = batch
    rollout = grpo.Rollout(ids, attention, adv, loss_mask, old, ref, torch.zeros(len(ids), c))
    grpo.accumulate_gradients(model, rollout, cfg)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_micro_batched_gradient_equals_full_batch(tiny, loss_type, beta):
    model = copy.deepcopy(tiny[0]).train()
    batch = batch_for_gradients(tiny[1])
    n, c = len(batch[0]), batch[2]
    old = torch.randn(n, c) * 0.1 - 3 if beta else None       # also exercise mu > 1 (given old log-probs)
    ref = torch.randn(n, c) * 0.1 - 3 if beta else None
    full = gradient(model, tiny[1], batch,
                    Config(loss_type=loss_type, beta=beta, clip_eps_high=0.2, micro_batch_size=n), old, ref)
    for size in (1, 3):
        micro = gradient(model, tiny[1], batch,
                         Config(loss_type=loss_type, beta=beta, clip_eps_high=0.2, micro_batch_size=size),
                         old, ref)
        assert full.abs().max() > 0 and torch.allclose(full, micro, atol=1e-6, rtol=1e-4)


def test_detached_current_logprobs_give_the_same_gradient_as_old_ones(tiny):
    """mu = 1: using logp.detach() as pi_old equals computing pi_old in a separate no-grad pass."""
    model = copy.deepcopy(tiny[0]).train()
    batch = batch_for_gradients(tiny[1])
    cfg = Config(beta=0.0, clip_eps_high=0.2)
    old = grpo.logprobs_no_grad(model, batch[0], batch[1], batch[2], cfg)
    assert torch.allclose(gradient(model, tiny[1], batch, cfg), gradient(model, tiny[1], batch, cfg, old=old),
                          atol=1e-7)


def test_prompts_are_left_padded_and_cut_from_the_left(tiny):
    tokenizer = tiny[1]
    cfg = Config(template="plain", max_prompt_tokens=4)
    ids, mask, cut = data.encode_prompts(tokenizer, [{"question": "123456"}, {"question": "1+2"}], cfg, "cpu")
    assert cut == 1 and ids.shape == (2, 4)
    assert tokenizer.decode(ids[0]) == "456\n"                     # the last 4 tokens kept
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]] and tokenizer.decode(ids[1]) == "1+2\n"
    ids, mask, cut = data.encode_prompts(tokenizer, [{"question": "12"}, {"question": "1+2"}], cfg, "cpu")
    assert cut == 0 and mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]] and ids[0, 0] == tokenizer.pad_token_id


def test_a_model_that_returns_no_cache_is_refused_in_one_line():
    """FalconH1 under transformers 4.x returns no cache unless given one: sampling cannot go on."""
    class NoCache(Scripted):
        def forward(self, *args, **kwargs):
            return types.SimpleNamespace(logits=super().forward(*args, **kwargs).logits)
    with pytest.raises(grpo.ConfigError, match=r"^model: NoCache returns no KV cache under transformers "):
        draw(NoCache([[5, 2]]), torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), 4,
                    torch.tensor([2]), 0)
