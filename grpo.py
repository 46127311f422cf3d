"""
grpo.py: Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300) in one file.

GRPO trains a causal LM from rule-based rewards without a value model. For each question it
samples a group of G completions, scores them, and gives every token of completion i the
advantage A_i = (r_i - mean(r)) / (std(r) + eps) of its reward within the group, in a PPO-style
clipped objective with a k3 KL penalty towards a frozen reference model. Read top to bottom: the
config, the math, sampling and log-probs, one GRPO step, the loop, then plumbing to skip. Beside
it: objectives.py (later variants), engine.py (loading, LoRA, faster samplers equal to `sample`),
tools.py (tool calls), rewards.py, data.py (tasks, evaluation), sft.py (the cold start),
distributed.py (torchrun) and runs.py (the run directory: checkpoints, resume, logs).

  python grpo.py                                  # offline CPU demo: tiny model, cold start, GRPO
  python grpo.py --config configs/gspo_demo.py    # a variant: configs/ is the catalogue
  python grpo.py --config configs/gsm8k_qwen.py   # a real model on one GPU (bf16 autocast)
  torchrun --nproc_per_node=8 grpo.py --config configs/gsm8k_qwen.py   # 8 GPUs (or --sharding=fsdp)
  python grpo.py --resume=runs/default            # continue from the latest checkpoint
  python grpo.py --model=RUN_DIR --eval_only=True --eval_k=8   # evaluate a trained model
  python grpo.py --help                           # every flag, its default and its paper value
"""
import dataclasses
import functools
import math
import os
import random
import sys
import time
from typing import Literal, NamedTuple, Optional

import torch

import data
import distributed
import lmhead
import objectives
import runs
import tools
from configurator import ConfigError, Path, parse_args, unread
from distributed import DistributedOptions, all_sum, every_rank_done, gather, my_share, say
from engine import (Definition, EngineOptions, LoraOptions, Sampled, add_lora, cache_name, cache_of,
                    can_share_prompts, draw_uniforms, merged_weights, new_cache, open_policy, open_reference,
                    positions_of, shares_prompt_pass, uses_bf16)
from rewards import RewardOptions, parse_reward_spec, reflects, score
from runs import RunOptions
from sft import ColdStart, cold_start

# ----------------------------------------------------------------------------
# config: defaults -> --config FILE -> --key=value; the defaults are the CPU demo's. GRPO's own knobs
# are here; the option groups of the other parts live beside their code and are listed in OPTIONS.


@dataclasses.dataclass
class Objective:
    # the objective (DeepSeekMath eq. 3); its later variants: objectives.Variants
    advantage: Literal["grpo", "rloo", "reinforce_pp"] = "grpo"  # the estimator: ADVANTAGES
    surrogate: Literal["clip", "cispo"] = "clip"  # the per-token loss: SURROGATES (MiniMax-M1: cispo)
    loss_type: Literal["grpo", "dapo", "dr_grpo", "cispo"] = "grpo"  # aggregation (cispo: surrogate=cispo)
    scale_rewards: Literal["group", "batch", "none"] = "group"  # std dividing A (Dr. GRPO: none)
    adv_eps: float = 1e-4          # eps in (r - mean) / (std + eps)
    clip_eps_low: float = 0.2      # ratio clipped below at 1 - eps_low (DeepSeekMath: 0.2)
    clip_eps_high: Optional[float] = None  # above at 1 + eps_high; None = eps_low (DAPO: 0.28)
    beta: float = 0.04             # k3 KL coefficient; 0 loads no reference model (DeepSeekMath: 0.04)
    num_iterations: int = 1        # mu: policy updates per batch of samples (DeepSeekMath: 1)
    ref_sync_every: int = 0        # steps between reference updates; 0 = fixed (DeepSeekMath: iterative RL)
    ref_sync_alpha: float = 1.0    # ref <- alpha * theta + (1 - alpha) * ref; 1.0 = hard copy
    mask_truncated: bool = False   # leave completions without EOS out of the loss (DAPO: True)
    drop_zero_std_groups: bool = False  # leave groups with equal rewards out (DAPO: True, resampled)

    def __post_init__(self):
        if self.loss_type == "cispo":  # the old name of CISPO: its surrogate, aggregated over tokens
            self.renamed_from, self.surrogate, self.loss_type = self.surrogate, "cispo", "dapo"


# the option groups of the other parts, each with its own checks(cfg), in the order --help shows them
OPTIONS = (objectives.Variants, EngineOptions, LoraOptions, ColdStart, data.DataOptions, data.EvalOptions,
           RewardOptions, tools.ToolOptions, RunOptions, DistributedOptions)


@dataclasses.dataclass
class Config(Objective, *OPTIONS):
    # the model
    model: Path = "tiny"           # hub name or local path; "tiny" builds a ~1M-param Llama locally
    seed: int = 0                  # seeds data split, init, sampling; runs repeat on one machine
    # sampling
    max_steps: int = 800           # GRPO steps; each samples prompts_per_step x group_size completions
    prompts_per_step: int = 8      # questions per step (DeepSeekMath: 1024 samples / 64 = 16)
    group_size: int = 8            # G completions per question (DeepSeekMath: 64)
    max_new_tokens: Optional[int] = None  # None = 32 for model="tiny", else 256 (DeepSeekMath: 1024)
    temperature: float = 1.0       # sampling temperature (DeepSeekMath: 1.0)
    top_p: float = 1.0             # nucleus sampling (DeepSeekMath: 1.0)
    rewards: str = "accuracy:1,format:0.5"  # name:weight of rewards.REWARDS, or FILE.py:FUNCTION:weight
    # optimiser
    lr: Optional[float] = None     # AdamW peak lr; None = 3e-4 for model="tiny", else 1e-6 (DeepSeekMath)
    warmup_steps: int = 10         # linear warmup, then cosine decay
    min_lr_ratio: float = 0.1      # cosine floor as a fraction of lr
    weight_decay: float = 0.0      # AdamW weight decay (DeepSeekMath: not stated; TRL: 0)
    adam_betas: tuple = (0.9, 0.99)  # AdamW betas
    grad_clip: float = 1.0         # max global grad norm; 0 = off
    micro_batch_size: int = 64     # completions per forward/backward; gradients accumulate

    def __post_init__(self):  # the demo's schedule applies to the demo's model only
        for key, (demo, pretrained) in MODEL_DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, demo if self.model == "tiny" else pretrained)
        self.clip_eps_high = self.clip_eps_low if self.clip_eps_high is None else self.clip_eps_high
        super().__post_init__()


# ----------------------------------------------------------------------------
# the math: pure functions on tensors


def group_advantages(rewards, group_size, scale="group", eps=1e-4, baseline=None):
    """Advantages [N] from rewards [N] of N/G consecutive groups of G completions (DeepSeekMath):
    A_i = (r_i - mean_group(r)) / (std_group(r) + eps). baseline: a variant's in place of the group
    mean, [N/G, G] -> [N/G, G] (RLOO's). scale: group; batch, the std of all N rewards; none, no
    division (Dr. GRPO). std is unbiased. A group whose rewards are all equal gets exactly 0."""
    r = rewards.view(-1, group_size)
    advantages = r - (r.mean(1, keepdim=True) if baseline is None else baseline(r))
    if scale == "group":
        advantages = advantages / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + eps)
    all_equal = (r == r[:, :1]).all(1, keepdim=True)  # set last: rounding or eps = 0 could leave 1e-8 or 0/0
    return torch.where(all_equal, 0.0, advantages).view(-1)


# the advantage estimators by name (cfg.advantage): (rewards [N], group_size, scale, eps) -> [N], all 0
# exactly for a group whose rewards are all equal, and only for one (train() reads "no signal" from that).
# A new one is a function, a line here and its name in Objective.advantage's Literal.
ADVANTAGES = {"grpo": group_advantages,
              "rloo": functools.partial(group_advantages, baseline=objectives.rloo_baseline),
              "reinforce_pp": objectives.reinforce_pp_advantages}


def k3_kl(logp, ref_logp):
    """Per-token KL(pi_theta || pi_ref) estimate, k3 = exp(ref - logp) - (ref - logp) - 1
    (DeepSeekMath eq. 4): unbiased for samples from pi_theta and never negative. [B, T] -> [B, T]."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_surrogate(log_ratio, advantages, eps_low, eps_high, delta=0.0):
    """Per-token PPO loss -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A), rho =
    exp(log_ratio) [B, T], advantages [B]; and where the clip is active: low (rho < 1 - eps_low,
    A < 0) and high (rho > 1 + eps_high, A > 0), [B, T] bool each."""
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    unclipped = objectives.delta_capped(ratio, delta) if delta else ratio  # variant: INTELLECT-2's delta
    loss = -torch.min(unclipped * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    return loss, (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0)


# the per-token losses by name (cfg.surrogate): (logp, log_ratio [B, T], advantages [B], cfg) ->
# (loss, clipped low, clipped high) [B, T] each; a new one is a line here and a name in the Literal
SURROGATES = {
    "clip": lambda logp, log_ratio, adv, o: clipped_surrogate(log_ratio, adv, o.clip_eps_low, o.clip_eps_high,
                                                              o.delta),
    "cispo": lambda logp, log_ratio, adv, o: objectives.cispo_surrogate(logp, log_ratio, adv, o.cispo_cap)}


def loss_mask(mask, zero_std_groups, truncated, drop_zero_std_groups=False, mask_truncated=False):
    """The tokens the loss sees, [N, T]: `mask` (the policy's own tokens of each completion) less
    whole completions left out by DAPO's filters (arXiv 2503.14476): those of groups whose rewards
    are all equal (zero_std_groups [N/G]; dynamic sampling without the resampling), and those that
    never reached EOS (truncated [N]; overlong filtering)."""
    keep = torch.ones(len(mask), dtype=torch.bool, device=mask.device)
    if drop_zero_std_groups:
        keep &= ~zero_std_groups.repeat_interleave(len(mask) // len(zero_std_groups))
    if mask_truncated:
        keep &= ~truncated
    return mask * keep[:, None]


def loss_denominator(loss_mask, loss_type, max_new_tokens):
    """What a loss type divides the summed per-token loss by, counted on loss_mask [N, T] (this
    rank's rows, the policy's own tokens; sum it over ranks): grpo, the completions in the loss;
    dapo, their tokens; dr_grpo, every completion sampled times max_new_tokens, a constant that
    DAPO's filters and tools' results do not move (TRL's: rows x max_completion_length)."""
    if loss_type == "grpo":
        return (loss_mask.sum(1) > 0).sum()
    if loss_type == "dapo":
        return loss_mask.sum()
    if loss_type == "dr_grpo":
        return torch.tensor(len(loss_mask) * max_new_tokens, device=loss_mask.device)
    raise ValueError(f"loss_type: {loss_type!r} is not grpo, dapo or dr_grpo")


def aggregate_loss(per_token, mask, loss_type, denominator):
    """Scalar loss from per-token losses [B, T] and mask [B, T]; `denominator` is the whole batch's
    (loss_denominator summed over micro-batches and ranks), so summing this over micro-batches
    gives exactly the full-batch loss:
      grpo:    sum_i (1/|o_i|) sum_t l_it / completions in the loss   (DeepSeekMath eq. 3)
      dapo:    sum_i sum_t l_it / tokens in the loss                   (DAPO's token-level loss)
      dr_grpo: sum_i sum_t l_it / (completions sampled * max_new_tokens)  (Dr. GRPO)"""
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / denominator
    return masked.sum() / denominator


# ----------------------------------------------------------------------------
# sampling and log-probs: the definition. engine.py's static KV cache picks the same tokens from the same
# uniforms, vLLM the same greedy ones, and the tests hold them to it token for token.


def picking(temperature, top_p):
    """How a step picks its token: greedy (temperature 0), sample, or nucleus (top_p < 1)."""
    return "greedy" if temperature == 0 else "nucleus" if top_p < 1 else "sample"


def pick_token(logits, temperature, top_p, uniform, mode=None):
    """One token per row from logits [B, V]: argmax when temperature is 0, else a sample of
    softmax(logits / temperature) restricted to the top_p nucleus, by inverse CDF: the first token
    whose cumulative probability exceeds uniform [B] * total. As the uniforms are drawn per
    completion, a completion does not depend on which rank or batch it is sampled in.
    temperature and top_p may be 0-d tensors (the compiled step's), with mode (picking) given."""
    mode = mode or picking(temperature, top_p)
    if mode == "greedy":
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if mode == "nucleus":
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keeps the top token always
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    cdf = probs.cumsum(-1)
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return (cdf <= target).sum(-1).clamp(max=len(cdf[0]) - 1)  # never a token of probability 0


def pick_and_score(logits, temperature, top_p, uniform, mode=None):
    """pick_token, and the picked token's log-prob and the entropy under softmax(logits /
    temperature) (temperature 0: the plain softmax) -> three [B] tensors."""
    mode = mode or picking(temperature, top_p)
    token = pick_token(logits, temperature, top_p, uniform, mode)
    scaled = logits if mode == "greedy" else logits / temperature
    entropy = torch.special.entr(torch.softmax(scaled, -1)).sum(-1)
    return token, torch.log_softmax(scaled, -1).gather(-1, token[:, None]).squeeze(-1), entropy


def prefill_prompts(model, prompt_ids, prompt_mask, share=True):
    """Run each distinct prompt of left-padded prompt_ids [B, P] once (a group's G rows share one
    pass), then copy its KV cache (transformers' own, so that every family works) and last logits
    to every row that has it; gradients flow back through the copies. share=False, or a model whose
    cache cannot be copied, runs every row. -> (logits [B, 1, V], the cache as a keyword argument
    for the next forward call)."""
    both = torch.cat([prompt_ids, prompt_mask], 1)
    share = share and can_share_prompts(model)
    distinct, rows = torch.unique_consecutive(both, dim=0, return_inverse=True) if share else (both, None)
    ids, mask = distinct.split(prompt_ids.size(1), 1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask), use_cache=True,
                logits_to_keep=1, **new_cache(model, share))
    logits, cache = out.logits, cache_of(model, out)
    if rows is not None and len(distinct) < len(prompt_ids):
        cache.batch_select_indices(rows)
        logits = logits[rows]
    return logits, {cache_name(model): cache}


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, how):
    """Completions of left-padded prompts [B, P], as `how` (engine.Sampling: max_new_tokens,
    eos_ids, pad_id, temperature, top_p, uniforms [B, max_new_tokens] or None to draw them,
    share_prompt) says: each group's prompt prefilled once, then a token at a time with the KV
    cache, token t of row b picked by uniforms[b, t]; pad after a row's first EOS. -> Sampled:
    tokens, the sampler's log-prob of each and the entropy of softmax(logits / temperature) at each
    position, [B, T] each, T <= max_new_tokens: it stops once every row, on every rank, has ended."""
    uniforms = draw_uniforms(prompt_ids, how) if how.uniforms is None else how.uniforms
    logits, cache = prefill_prompts(model, prompt_ids, prompt_mask, how.share_prompt)
    logits, mask, positions = logits[:, -1], prompt_mask, positions_of(prompt_mask)[:, -1:]
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)
    picked = []  # (token, log-prob, entropy) at each position, [B] each
    for t in range(how.max_new_tokens):
        token, logp, entropy = pick_and_score(logits.float(), how.temperature, how.top_p, uniforms[:, t])
        token = torch.where(done, how.pad_id, token)
        picked.append((token, logp, entropy))
        done |= torch.isin(token, how.eos_ids)
        if t == how.max_new_tokens - 1 or (t % 8 == 7 and every_rank_done(done)):  # a wait for the device
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = positions + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                       use_cache=True, **cache).logits[:, -1]
    tokens, logps, entropies = (torch.stack(column, 1) for column in zip(*picked))
    return Sampled(tokens, logps, entropies)


def completion_logprobs(model, input_ids, attention_mask, num_completion, temperature=1.0, share_prompt=False,
                        with_entropy=True):
    """log pi(o_t | q, o_<t) under softmax(logits / temperature), the distribution the tokens were
    sampled from, for the last num_completion tokens of input_ids [B, L] (left-padded prompt +
    completion) -> logp [B, C] and entropy [B, C] (None unless with_entropy), with gradients
    where they are enabled. Logits exist only at completion positions; log-softmax runs a block of
    at most 2^24 logits at a time, so a large batch's full-vocabulary log-probs are never held at
    once. share_prompt: a group's rows share one pass over their prompt (prefill_prompts; the same
    result, fewer FLOPs; not under gradient checkpointing, which keeps no cache), the caller's
    choice, so that every rank makes as many forward calls (FSDP gathers weights in each)."""
    positions = positions_of(attention_mask)
    prompt_len = input_ids.size(1) - num_completion
    if shares_prompt_pass(model, share_prompt):
        first, cache = prefill_prompts(model, input_ids[:, :prompt_len], attention_mask[:, :prompt_len])
        rest = model(input_ids=input_ids[:, prompt_len:], attention_mask=attention_mask, use_cache=True,
                     position_ids=positions[:, prompt_len:], logits_to_keep=num_completion, **cache).logits
        logits = torch.cat([first, rest[:, :-1]], 1)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       use_cache=False, logits_to_keep=num_completion + 1).logits[:, :-1]
    targets = input_ids[:, -num_completion:]
    logps, entropies = [], []
    rows = max(1, (1 << 24) // (num_completion * logits.size(-1)))
    for block, block_targets in zip(logits.split(rows), targets.split(rows)):
        block = block.float() / temperature
        lse = torch.logsumexp(block, -1)
        logps.append(block.gather(-1, block_targets[..., None]).squeeze(-1) - lse)
        if with_entropy:  # H = logsumexp - E_p[logit]: differentiable, and finite where p underflows to 0
            entropies.append(lse - (torch.softmax(block, -1) * block).sum(-1))
    return torch.cat(logps), torch.cat(entropies) if with_entropy else None


# what engine.py's samplers are built on (and its Engine.logprobs, sft.py's and r1.py's)
DEFINITION = Definition(sample=sample, logprobs=completion_logprobs, pick=pick_and_score, picking=picking)


def logprobs(model, ids, attention, num_completion, cfg, with_entropy=False):
    """completion_logprobs at cfg.temperature, under bf16 autocast when cfg.bf16: the weights stay
    fp32 (the optimizer's master copy) and the matmuls run in bf16 (as sampling does)."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, ids.device)):
        if lmhead.matters(model, cfg):  # lmhead.py: the same values, never [B, C, V] logits at once
            return lmhead.logprobs(model, ids, attention, num_completion, cfg, with_entropy, prefill_prompts)
        return completion_logprobs(model, ids, attention, num_completion, cfg.temperature, cfg.share_prompt,
                                   with_entropy)


@torch.no_grad()
def logprobs_no_grad(model, ids, attention, num_completion, cfg):
    """log-probs [B, C] as `logprobs`, without gradients, micro_batch_size rows at a time: the old
    policy's and the reference's."""
    M = cfg.micro_batch_size
    return torch.cat([logprobs(model, ids[i:i + M], attention[i:i + M], num_completion, cfg)[0]
                      for i in range(0, len(ids), M)])


# ----------------------------------------------------------------------------
# one GRPO step, in parts


class Rollout(NamedTuple):
    """A step's samples, by row: ids [N, L] (prompt + completion) and attention [N, L]; for the
    completion's C tokens: advantages [N], loss_mask [N, C], and the log-probs [N, C] of the old
    policy (None when mu = 1), of the reference (None when beta = 0) and of the sampler."""
    ids: torch.Tensor
    attention: torch.Tensor
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    old_logp: Optional[torch.Tensor]
    ref_logp: Optional[torch.Tensor]
    sampler_logp: torch.Tensor

    def rows(self, part):
        return Rollout(*(None if t is None else t[part] for t in self))


def grpo_loss(logp, batch, denominator, o):
    """The objective on one micro-batch, minimised: the surrogate (o.surrogate, clipped by
    default) of rho = pi_theta / pi_old per token, + beta * k3 KL, aggregated by loss_type over
    `denominator` (the whole batch's). logp [B, T] with gradients; batch: the micro-batch's
    Rollout with its old log-probs; o: the Objective's numbers. Each variant plugs in at its
    marked line. -> (loss, masked sums for logging, as tensors: nothing waits for the device
    until the step is logged)."""
    mask = batch.loss_mask
    log_ratio = logp - batch.old_logp
    if o.importance_sampling_level == "sequence":  # variant: GSPO's one ratio per completion
        log_ratio = objectives.sequence_log_ratio(log_ratio, mask)
    per_token, low, high = SURROGATES[o.surrogate](logp, log_ratio, batch.advantages, o)
    if o.tis_cap:  # variant: truncated importance sampling, towards the sampler's own distribution
        per_token = per_token * objectives.truncated_is_weight(batch.old_logp, batch.sampler_logp, o.tis_cap)
    stats = {"clip_low": (low * mask).sum(), "clip_high": (high * mask).sum()}
    if o.beta > 0:
        kl = k3_kl(logp, batch.ref_logp)
        per_token = per_token + o.beta * kl
        stats["kl"] = (kl.detach() * mask).sum()
    return aggregate_loss(per_token, mask, o.loss_type, denominator), stats


def accumulate_gradients(model, rollout, cfg):
    """Backpropagate the whole batch's loss a micro-batch at a time; the gradient equals the
    full-batch one as every micro-batch is divided by the whole batch's denominator, summed over
    ranks under torchrun. -> this rank's summed loss and masked statistics (tensors)."""
    C, M = rollout.loss_mask.size(1), cfg.micro_batch_size
    denominator = all_sum(loss_denominator(rollout.loss_mask, cfg.loss_type, cfg.max_new_tokens)).clamp(min=1)
    tokens = all_sum(rollout.loss_mask.sum()).clamp(min=1) if cfg.entropy_coef else None  # the bonus's mean
    sums = {}
    for i in range(0, len(rollout.ids), M):
        batch = rollout.rows(slice(i, i + M))
        with distributed.sync_gradients(model, last=i + M >= len(rollout.ids)):
            logp, entropy = logprobs(model, batch.ids, batch.attention, C, cfg, cfg.entropy_coef > 0)
            if batch.old_logp is None:  # mu = 1: the detached current log-probs (ratio 1, the same gradient)
                batch = batch._replace(old_logp=logp.detach())
            loss, stats = grpo_loss(logp, batch, denominator, cfg)
            if cfg.entropy_coef:  # variant: the entropy bonus
                loss = loss - objectives.entropy_bonus(entropy, batch.loss_mask, cfg.entropy_coef, tokens)
            distributed.backward(loss)
        gap = batch.old_logp - batch.sampler_logp  # the sampler's log-probs against the trainer's; k3 below
        stats.update(loss=loss.detach(), mismatch_abs=(gap.abs() * batch.loss_mask).sum(),
                     mismatch_kl=((torch.expm1(gap) - gap) * batch.loss_mask).sum())  # exact for tiny gaps
        sums = {key: sums.get(key, 0.0) + value for key, value in stats.items()}
    return sums


class Update(NamedTuple):
    sums: dict                     # accumulate_gradients' statistics, summed over the updates made
    grad_norm: Optional[float]     # the last update's, before clipping; None without one
    updates: int                   # mu, fewer after a skipped one, 0 when the loss saw no token
    skipped: bool                  # an update had a non-finite loss or gradient and was not applied


def policy_update(model, optimizer, rollout, cfg, lr):
    """mu = num_iterations AdamW steps at learning rate lr on one batch, none when the loss sees no
    token on any rank. A step whose loss or gradient is not finite leaves weights and Adam as they
    were and ends the updates. -> Update."""
    sums, grad_norm = {}, None
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    if all_sum(rollout.loss_mask.sum()).item() == 0:
        return Update(sums, grad_norm, 0, False)
    for update in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        stats = accumulate_gradients(model, rollout, cfg)
        norm = distributed.clip_grad_norm(model, cfg.grad_clip)
        if not (math.isfinite(norm) and math.isfinite(all_sum(stats["loss"]))):
            optimizer.zero_grad(set_to_none=True)
            return Update(sums, grad_norm, update, True)
        sums, grad_norm = {k: sums.get(k, 0.0) + v for k, v in stats.items()}, norm
        optimizer.step()
    return Update(sums, grad_norm, cfg.num_iterations, False)


@torch.no_grad()
def sync_reference(ref_model, model, alpha):
    """ref <- alpha * theta + (1 - alpha) * ref, parameter by parameter (alpha = 1: hard copy)."""
    distributed.reshard(ref_model, model)
    for ref_param, param in zip(ref_model.parameters(), model.parameters()):
        ref_param.lerp_(param.detach().to(ref_param.dtype), alpha)


# ----------------------------------------------------------------------------
# training


def train(cfg):
    """GRPO on cfg.task from cfg.model, or from a run's latest checkpoint (cfg.resume) -> summary."""
    run = setup(cfg)  # which model trains, from where, its reference and sampler: in the plumbing below
    cfg, sampler, tokenizer, device = run.cfg, run.engine, run.engine.tokenizer, run.device
    G, T, spec = cfg.group_size, cfg.max_new_tokens, parse_reward_spec(cfg.rewards)
    weights, judge, shared = torch.tensor([w for _, w in spec]), data.correctness(cfg.task), run.shared
    model = torch.compile(run.model, dynamic=True) if cfg.compile else run.model  # the log-prob forward

    with runs.stop_signals() as signals:
        for step in range(run.step, cfg.max_steps):
            # 1. sample G completions for each of this rank's questions
            t0 = runs.clock(device)
            examples = my_share(data.step_examples(run.train_set, step, cfg.prompts_per_step, cfg.seed))
            uniforms = my_share(torch.rand(cfg.prompts_per_step * G, T)).to(device)  # one stream
            prompt_ids, prompt_mask, prompts_cut = data.encode_prompts(tokenizer, examples, cfg, device)
            prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
            # `sample` above, or a faster one equal to it (engine.py), with the mask of the policy's own
            # tokens, the lengths and the sampler's own figures for the log
            sampled = sampler.sample(prompt_ids, prompt_mask, T, cfg.temperature, cfg.top_p, uniforms)
            truncated = ~torch.isin(sampled.tokens, sampler.eos_ids).any(1)
            texts = data.decode(tokenizer, sampled.tokens, cfg.prefill)
            t1 = runs.clock(device)

            # 2. rewards [N, K] of the K reward functions, group-relative advantages, what the loss sees
            scores, failures, correct = score(texts, examples, sampled.lengths, spec, judge, shared)
            scores, correct = gather(scores), gather(correct)  # every rank sees the whole step from here on
            t2 = runs.clock(device)
            rewards = scores @ weights
            advantages = ADVANTAGES[cfg.advantage](rewards, G, cfg.scale_rewards, cfg.adv_eps)
            zero_std = (advantages.view(-1, G) == 0).all(1)  # groups whose rewards are all equal: no signal
            advantages = my_share(advantages).to(device)
            mask = loss_mask(sampled.mask, my_share(zero_std).to(device), truncated, cfg.drop_zero_std_groups,
                             cfg.mask_truncated)

            # 3. old and reference log-probs: one no-grad pass each, only when needed
            ids = torch.cat([prompt_ids, sampled.tokens], 1)
            attention = torch.cat([prompt_mask, torch.ones_like(sampled.tokens)], 1)
            C = sampled.tokens.size(1)
            old_logp = logprobs_no_grad(model, ids, attention, C, cfg) if cfg.num_iterations > 1 else None
            ref_logp = logprobs_no_grad(run.ref_model, ids, attention, C, cfg) if cfg.beta else None
            rollout = Rollout(ids, attention, advantages, mask, old_logp, ref_logp, sampled.logp)
            t3 = runs.clock(device)

            # 4. mu policy updates at this step's learning rate, then the reference model
            lr = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            update = policy_update(model, run.optimizer, rollout, cfg, lr)
            synced = cfg.beta > 0 and cfg.ref_sync_every > 0 and (step + 1) % cfg.ref_sync_every == 0
            if synced:
                sync_reference(run.ref_model, run.policy, cfg.ref_sync_alpha)
            t4 = runs.clock(device)

            # 5. log, evaluate, checkpoint
            whole = {"rewards": rewards, "scores": {name: scores[:, j] for j, (name, _) in enumerate(spec)},
                     "correct": correct, "zero_std": zero_std, "lengths": sampled.lengths,
                     "truncated": truncated, **sampled.info}
            counts = {"loss_tokens": mask.sum(), "tokens": sampled.mask.sum(), "reward_errors": failures,
                      "entropy": (sampled.entropy * sampled.mask).sum(), "prompts_cut": prompts_cut,
                      "reflecting": sum(map(reflects, texts))}
            row = runs.step_metrics(step + 1, whole, counts, update, (t0, t1, t2, t3, t4))
            row.update(lr=lr, ref_synced=synced, **sampler.timings())
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                row.update({f"eval_{k}": v for k, v in data.evaluate(sampler, run.test_set, cfg).items()})
            run.log.write(row, (examples, texts, whole, advantages))  # metrics, progress, samples
            stop = run.log.stop(signals)  # a signal to any rank, or max_bad_steps bad steps in a row
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stop:
                run.save(step + 1)
            if stop:  # after the checkpoint: say why, and how to go on
                raise stop
    after = data.evaluate(sampler, run.test_set, cfg) if cfg.eval_size else {}
    return run.log.summarise(after, cfg.eval_size and len(run.test_set))


# ----------------------------------------------------------------------------
# plumbing a learner may skip: which model trains, saving, evaluating a model, the command

# the defaults that depend on the model: (the tiny demo's, a pretrained model's): no cold start unless
# asked, DeepSeekMath's (and TRL's) lr, room to reason (TRL's max_completion_length: 256)
MODEL_DEFAULTS = {"sft_steps": (150, 0), "sft_lr": (1e-3, 1e-5), "max_new_tokens": (32, 256),
                  "lr": (3e-4, 1e-6)}
AT_LEAST_ONE = ("max_steps", "prompts_per_step", "max_new_tokens", "num_iterations", "micro_batch_size")
NON_NEGATIVE = ("clip_eps_low", "clip_eps_high", "beta", "adv_eps", "ref_sync_every", "lr", "weight_decay",
                "grad_clip", "warmup_steps")
# what a resumed checkpoint cannot honour: the model it started from, its seed, cold start, adapters
RESUME_FIXED = ("model", "seed", *(f.name for f in dataclasses.fields(ColdStart)),
                *(f.name for f in dataclasses.fields(LoraOptions)))


def lr_factor(step, warmup_steps, total_steps, min_ratio):
    """The learning rate at `step` as a fraction of the peak: linear warmup to 1 over warmup_steps,
    then cosine decay to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def parse_config(argv, cls=Config, read_elsewhere=()):
    """defaults -> --config FILE -> --key=value (or --resume=DIR: that run's config), checked by the
    core and by every option group of OPTIONS (and cls, where it brings checks of its own) before
    anything loads; read_elsewhere: keys the caller reads (never refused as unread)."""
    cfg = parse_args(cls, argv, runs.saved_config, RESUME_FIXED)
    cfg.given -= set(read_elsewhere)
    cfg.out_dir = runs.run_dir(cfg, argv)
    groups = OPTIONS + ((cls,) if "checks" in vars(cls) else ())  # r1.py's config adds its own
    rules = core_checks(cfg) + [rule for group in groups for rule in group.checks(cfg)]
    problems = [message for ok, message in rules if not ok]
    if problems:
        raise ConfigError(problems[0])
    return cfg


def core_checks(cfg):
    """The core's rules for values; each option group of OPTIONS brings its own (its `checks`)."""
    ranks, betas = distributed.world_size_asked(), cfg.adam_betas
    return [
        *[(getattr(cfg, k) >= 1, f"{k}: must be at least 1") for k in AT_LEAST_ONE],
        *[(getattr(cfg, k) >= 0, f"{k}: must not be negative") for k in NON_NEGATIVE],
        (cfg.group_size >= 2,
         "group_size: must be at least 2 (advantages compare completions within a group)"),
        (cfg.clip_eps_low < 1, "clip_eps_low: must be below 1 (the ratio is clipped at 1 - clip_eps_low)"),
        (0 < cfg.top_p <= 1, "top_p: must be in (0, 1]"),
        (0 < cfg.ref_sync_alpha <= 1, "ref_sync_alpha: must be in (0, 1]"),
        (0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio: must be in [0, 1]"),
        (len(betas) == 2 and all(type(b) in (int, float) and 0 <= b < 1 for b in betas),
         "adam_betas: two numbers in [0, 1)"),
        (0 <= cfg.seed < 2**32, f"seed: {cfg.seed} is not in [0, 2^32 - 1]"),
        ("surrogate" not in cfg.given or getattr(cfg, "renamed_from", "cispo") == "cispo",
         f"loss_type: cispo, the old name of surrogate=cispo with loss_type=dapo, contradicts "
         f"surrogate={getattr(cfg, 'renamed_from', '')}"),
        (not cfg.model.startswith((".", "/")) or os.path.isdir(cfg.model),
         f"model: {cfg.model}: no such directory"),
        (cfg.prompts_per_step % ranks == 0, f"prompts_per_step: {cfg.prompts_per_step} does not divide among "
                                            f"{ranks} ranks (each rank samples whole groups)"),
        *unread(cfg, not cfg.beta, ("ref_sync_every", "ref_sync_alpha"), "beta=0 loads no reference model"),
        *unread(cfg, cfg.beta and not cfg.ref_sync_every, ("ref_sync_alpha",),
                "the reference never moves (ref_sync_every=0)"),
        *unread(cfg, cfg.scale_rewards == "none" and cfg.advantage != "reinforce_pp", ("adv_eps",),
                "scale_rewards=none divides by no std"),
        *unread(cfg, cfg.advantage == "reinforce_pp", ("scale_rewards",),
                "advantage=reinforce_pp whitens over the batch itself")]


class Run(NamedTuple):
    """What setup() hands the loop."""
    cfg: Config                    # resolved: the prompt limit fitted to the model
    device: torch.device
    engine: object                 # engine.Engine: the policy's sampler (sample, eos_ids, tokenizer)
    policy: torch.nn.Module        # the policy itself
    model: torch.nn.Module         # what trains: the policy, wrapped for DDP/FSDP under torchrun
    ref_model: Optional[torch.nn.Module]  # None when beta = 0
    optimizer: torch.optim.Optimizer
    train_set: list
    test_set: list
    shared: dict                   # what the rewards read of the config
    step: int                      # the first step to run: 0, or a resumed run's
    log: runs.TrainingLog          # metrics.jsonl, samples.jsonl, the progress line, why to stop, summary
    save: object                   # save(step): a checkpoint of the run after `step`


def setup(cfg):
    """Which model trains, in order: a resumed run's checkpoint, or `model` (built for "tiny");
    on a fresh run, the cold start (sft_steps); LoRA's adapters on that; the reference (beta > 0:
    RL's starting point, or with LoRA the base with adapters off); the optimizer, and a resumed
    run's state. What trains is wrapped for DDP/FSDP (twice only for LoRA after a cold start:
    every weight, then the adapters). The run directory changes once every check has passed."""
    started, (device, train_set, test_set) = time.time(), start(cfg)
    state, checkpoint = runs.open_resumed_run(cfg.out_dir) if cfg.resume else ({}, None)  # read only
    init_path = runs.init_model(cfg.out_dir, state) if state else data.initial_model(cfg)
    cold, saved_cfg = not state and cfg.sft_steps > 0, dataclasses.asdict(cfg)
    frozen = cfg.lora_rank and not cold  # a LoRA base that no cold start trains loads in dtype
    model, engine = open_policy(checkpoint if state and not cfg.lora_rank else init_path, cfg, device,
                                cfg.dtype if frozen else "float32", DEFINITION)
    cfg = data.resolve_prompt_limit(cfg, model, engine.tokenizer, train_set + test_set)
    train_model = distributed.distribute(model, cfg, device) if cold or not cfg.lora_rank else model
    if cold:
        init_path = cold_start(train_model, model, engine, train_set, cfg)
    adapter = os.path.join(checkpoint, "adapter") if state else None  # a resumed LoRA run's
    lora = add_lora(model, cfg, adapter) if cfg.lora_rank else None
    train_model = distributed.distribute(model, cfg, device) if lora else train_model  # DDP over the adapters
    ref_model = None  # beta = 0: none at all; with LoRA: the base itself, adapters off
    if cfg.beta > 0:
        ref_model = open_reference(init_path, cfg, device, state.get("ref_model"), lora)  # resumed: synced
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    if state:
        runs.restore_training(state, model, optimizer)
    runs.begin_run(cfg.out_dir, saved_cfg, (checkpoint, state["step"]) if state else None)  # checks passed
    before = state["eval_before"] if state else data.evaluate(engine, test_set, cfg) if cfg.eval_size else {}
    if before and not state:
        say(f"before RL: greedy accuracy {before['accuracy']:.1%} on {len(test_set)} held-out questions")
    log = runs.TrainingLog(cfg, state, started, before)
    merged = (lambda: merged_weights(lora)) if lora else None  # LoRA: the run holds the merged model
    saving = runs.Saving(model, optimizer, ref_model if cfg.ref_sync_every else None, lora, merged, init_path,
                         saved_cfg)
    shared = {key: getattr(cfg, key) for key in ("language", "max_new_tokens", "overlong_buffer")}  # rewards'

    def save(step):  # a checkpoint after `step`: weights, optimizer, random streams, the log's counts
        runs.save_training(cfg, engine.tokenizer, saving, log.checkpoint(step))
    return Run(cfg=cfg, device=device, engine=engine, policy=model, model=train_model, ref_model=ref_model,
               optimizer=optimizer, train_set=train_set, test_set=test_set, shared=shared,
               step=state.get("step", 0), log=log, save=save)


def start(cfg):
    """Join torchrun's group, load the task, make the run directory, print the resolved config,
    seed the random streams -> (device, train set, test set)."""
    device = distributed.init_distributed(cfg)
    train_set, test_set = data.load_task(cfg.task, cfg.seed, cfg.data_path, cfg.eval_data_path, cfg.eval_size,
                                         cfg.digits)
    new = None if cfg.resume or cfg.eval_only else f"continue it with --resume={cfg.out_dir}, or start anew"
    runs.take_run_dir(cfg.out_dir, "resume" if cfg.resume else "out_dir", new)  # one run per directory
    runs.show_config(cfg, MODEL_DEFAULTS)
    say(f"data: {len(train_set)} training questions, {len(test_set)} held out")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # tensor cores for fp32
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return device, train_set, test_set


def evaluate_only(cfg):
    """Evaluate cfg.model (in cfg.dtype) on the held-out split; eval.json in out_dir."""
    device, train_set, test_set = start(cfg)
    path = data.initial_model(cfg)
    model, engine = open_policy(path, cfg, device, cfg.dtype, DEFINITION)
    cfg = data.resolve_prompt_limit(cfg, model, engine.tokenizer, train_set + test_set)
    distributed.distribute(model, cfg, device)  # FSDP shards the weights, as in training
    result = data.evaluate(engine, test_set, cfg)
    runs.write_json(os.path.join(cfg.out_dir, "eval.json"), {**result, "model": path, "config": vars(cfg)})
    shown = ", ".join(f"{name} {value:.4g}" for name, value in result.items())
    say(f"{path} on {len(test_set)} held-out questions: {shown}")
    distributed.barrier()
    return result


def main(argv):
    def run():
        cfg = parse_config(argv)
        if cfg.eval_only:
            return evaluate_only(cfg)
        with runs.interrupts_say_how_to_go_on(cfg.out_dir):
            train(cfg)
    return runs.cli("grpo.py", run)


if __name__ == "__main__":
    runs.exit(main(sys.argv[1:]))
