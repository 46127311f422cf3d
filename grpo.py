"""
grpo.py: Group Relative Policy Optimization in one file.

GRPO (DeepSeekMath, arXiv 2402.03300) trains a causal LM from rule-based rewards without a value
model: for each question it samples a group of G completions, scores them, and uses each
completion's reward relative to its group, A_i = (r_i - mean(r)) / (std(r) + eps), as the
advantage of every one of its tokens in a PPO-style clipped objective, with a k3 KL penalty
towards a frozen reference model. Read top to bottom: config, the math as pure functions, model
helpers, then the training loop. Run plumbing that computes nothing (torchrun collectives and
DDP/FSDP wrapping, crash-safe checkpoints, signals, progress) is in runs.py; config parsing and
validation in configurator.py; prompt templates, tasks and tokenising in data.py.

Where it departs from or extends the paper (each one a flag, paper default first):
  - scale_rewards=group|batch|none   none is Dr. GRPO (arXiv 2503.20783); unbiased std
  - loss_type=grpo|dapo|dr_grpo      per-sequence mean (paper), token mean (DAPO), constant
                                      (completions sampled x max_new_tokens, filtered or not, as TRL)
  - clip_eps_high                     DAPO's clip-higher (arXiv 2503.14476) when > clip_eps_low
  - mask_truncated, drop_zero_std_groups, the overlong reward: DAPO's other three changes
  - log-probs are taken at the sampling temperature, so the ratio compares the sampled policy
  - sft_steps: a short cold-start SFT on worked solutions before RL (DeepSeek-R1's phase 1);
    R1's other phases (SFT on pairs, rejection sampling, distillation) are in r1.py
  - sampling draws one uniform per token and completion and inverts the CDF, so that a
    completion is the same on 1 or N ranks (torchrun: groups are split across ranks)
  - share_prompt: a group's G sequences share one forward pass over their prompt, whose KV
    cache is copied to each (sampling's prefill, the reference and update passes): same result
  - weights train in fp32 (dtype=bfloat16: bf16 compute over fp32 master weights, as AdamW's
    small steps round away in bf16); dropout is off (disable_dropout); the demo's schedule
    (cold start, lr 3e-4) applies to model="tiny" only, a pretrained model gets lr 1e-6

Commands:
  python grpo.py                                   # offline CPU demo: tiny model, SFT, GRPO, before/after
  python grpo.py --config configs/gsm8k_qwen.py    # one GPU (bf16 autocast on CUDA)
  torchrun --nproc_per_node=8 grpo.py --config configs/gsm8k_qwen.py   # 8 GPUs, DDP (--sharding=fsdp shards)
  python grpo.py --config configs/NAME.py --max_steps=100 --lr=1e-6   # overrides follow the file
  python grpo.py --resume=runs/default             # continue from the latest checkpoint
  python grpo.py --config configs/gsm8k_qwen.py --model=runs/gsm8k_qwen --eval_only=True --eval_k=8
  python grpo.py --help                            # every flag with its default and paper value
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

import data
import rewards as R
from configurator import ConfigError, parse_args, validate
from runs import (Progress, Stop, all_sum, barrier, distribute, full_state, gather, init_distributed,
                  load_optimizer_state, open_resumed_run, rank_and_world, restore_rng, rng_state, save_checkpoint,
                  stop_signals, write_atomic)

# ----------------------------------------------------------------------------
# config: defaults -> --config FILE -> --key=value; the defaults are the CPU demo


@dataclass
class Config:
    # run
    model: str = "tiny"            # hub name or local path; "tiny" builds a ~1M-param Llama locally
    task: str = "arithmetic"       # arithmetic | countdown | gsm8k | jsonl (see data.py)
    data_path: str = ""            # training JSONL for gsm8k / jsonl
    eval_data_path: str = ""       # held-out JSONL; "" holds out the first eval_size rows of data_path
    template: str = "plain"        # r1zero | plain | chat (R1-Zero: r1zero)
    system_prompt: Optional[str] = None  # chat: the system message; None = R1's format instruction, "" = none
    prefill: str = ""              # text the answer starts with, after the prompt (R1: "<think>"); rewards see it
    digits: int = 2                # arithmetic: digits per operand
    out_dir: str = "runs/default"  # run directory: config, metrics, checkpoints, summary
    resume: str = ""               # run directory to continue from its latest checkpoint
    seed: int = 0                  # seeds data split, init, sampling; CPU runs are reproducible
    device: str = "auto"           # auto | cpu | cuda | cuda:N (under torchrun: each rank's LOCAL_RANK GPU)
    sharding: str = "ddp"          # under torchrun: ddp (a full copy per rank) | fsdp (weights, grads, Adam state sharded)
    dtype: str = "float32"         # float32 | bfloat16: bf16 compute over fp32 master weights, bf16 reference
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs flash-attn)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower updates
    eval_only: bool = False        # evaluate `model` on the held-out split and stop
    # cold start (DeepSeek-R1 phase 1)
    sft_steps: Optional[int] = None  # SFT steps on worked solutions before RL; None = 150 for model="tiny", else 0 (R1-Zero: 0)
    sft_examples: int = 500        # distinct worked examples the cold start sees (R1: thousands)
    sft_batch_size: int = 32       # examples per SFT step
    sft_lr: Optional[float] = None  # SFT learning rate (constant); None = 1e-3 for model="tiny", else 1e-5
    # sampling
    max_steps: int = 800           # GRPO steps; each samples prompts_per_step x group_size completions
    prompts_per_step: int = 8      # questions per step (DeepSeekMath: 1024 samples / 64 = 16)
    group_size: int = 8            # G completions per question (DeepSeekMath: 64)
    max_new_tokens: Optional[int] = None  # completion length cap; None = 32 for model="tiny", else 256 (DeepSeekMath: 1024)
    temperature: float = 1.0       # sampling temperature (DeepSeekMath: 1.0)
    top_p: float = 1.0             # nucleus sampling (DeepSeekMath: 1.0)
    max_prompt_tokens: int = 0     # longer prompts keep their last tokens; 0 = context - max_new_tokens
    prompt_overflow: str = "truncate"  # a prompt over max_prompt_tokens: truncate (counted) | reject at start
    # rewards
    rewards: str = "accuracy:1,format:0.5"  # name:weight from rewards.REWARDS (R1-Zero: accuracy + format)
    overlong_buffer: int = 0       # L_cache of the overlong reward (DAPO: 4096 of 20480 tokens)
    language: str = "en"           # target script of the language reward (R1: the prompt's language)
    # objective
    scale_rewards: str = "group"   # group | batch | none: std that divides advantages (Dr. GRPO: none)
    adv_eps: float = 1e-4          # eps in (r - mean) / (std + eps)
    clip_eps_low: float = 0.2      # ratio clipped below at 1 - eps_low (DeepSeekMath: 0.2)
    clip_eps_high: Optional[float] = None  # above at 1 + eps_high; None = eps_low (DAPO: 0.28)
    beta: float = 0.04             # k3 KL coefficient; 0 loads no reference model (DeepSeekMath: 0.04)
    loss_type: str = "grpo"        # grpo (per-sequence mean) | dapo (token mean) | dr_grpo (constant)
    num_iterations: int = 1        # mu: policy updates per batch of samples (DeepSeekMath: 1)
    ref_sync_every: int = 0        # steps between reference updates; 0 = fixed (DeepSeekMath iterative RL)
    ref_sync_alpha: float = 1.0    # ref <- alpha * theta + (1 - alpha) * ref; 1.0 = hard copy
    mask_truncated: bool = False   # leave completions without EOS out of the loss (DAPO: True)
    drop_zero_std_groups: bool = False  # leave groups with equal rewards out (DAPO: True, resampled)
    # optimisation
    lr: Optional[float] = None     # AdamW peak learning rate; None = 3e-4 for model="tiny", else 1e-6 (DeepSeekMath: 1e-6 for 7B)
    warmup_steps: int = 10         # linear warmup, then cosine decay
    min_lr_ratio: float = 0.1      # cosine floor as a fraction of lr
    weight_decay: float = 0.0      # AdamW weight decay (DeepSeekMath: not stated; TRL: 0)
    adam_betas: tuple = (0.9, 0.99)  # AdamW betas
    grad_clip: float = 1.0         # max global grad norm; 0 = off
    max_bad_steps: int = 10        # stop after this many consecutive steps with a non-finite loss/gradient
    micro_batch_size: int = 64     # completions per forward/backward; gradients accumulate
    share_prompt: bool = True      # a group's G sequences share one forward pass over their prompt (same result)
    disable_dropout: bool = True   # dropout off in the policy: the update sees the policy that sampled (TRL: disable_dropout)
    bf16: Optional[bool] = None    # bf16 autocast over fp32 weights; None = on CUDA, or with dtype=bfloat16
    compile: bool = False          # torch.compile the log-prob forward; off: no gain measured, ~100 s to compile
    # evaluation, logging, checkpoints
    eval_size: int = 200           # held-out questions for greedy accuracy before and after RL
    eval_every: int = 0            # steps between evaluations during RL; 0 = before and after only
    eval_batch_size: int = 200     # questions per greedy sampling batch
    eval_k: int = 0                # sampled pass@k: k samples per question at `temperature`; 0 = greedy only
    log_samples_every: int = 200   # steps between printed sample completions; 0 = never
    save_every: int = 400          # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2      # checkpoints kept on disk
    wandb: bool = False            # log to Weights & Biases (needs the package)

    def __post_init__(self):  # the demo's schedule applies to the demo's model only
        for key, (demo, pretrained) in MODEL_DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, demo if self.model == "tiny" else pretrained)


# the fields whose default depends on the model: (the tiny demo's, a pretrained model's). A
# pretrained model gets no cold start unless asked, an lr in the published range (DeepSeekMath 1e-6,
# TRL's default too) and room to reason (TRL's max_completion_length: 256).
MODEL_DEFAULTS = {"sft_steps": (150, 0), "sft_lr": (1e-3, 1e-5), "max_new_tokens": (32, 256), "lr": (3e-4, 1e-6)}


def parse_config(argv, cls=Config):
    """defaults -> --config FILE -> --key=value (or --resume=DIR: that run's config), validated."""
    cfg = parse_args(cls, argv, "train_config.json")
    if cfg.resume:
        cfg.out_dir = cfg.resume
    if cfg.clip_eps_high is None:
        cfg.clip_eps_high = cfg.clip_eps_low
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------
# the math: pure functions on tensors


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """A_i = (r_i - mean_group(r)) / (std + eps) for rewards [N] of N/G consecutive groups -> [N].
    scale: group = std of the group (DeepSeekMath), batch = std of all N, none = no division
    (Dr. GRPO). A group whose rewards are all equal gets exactly 0, never NaN."""
    r = rewards.view(-1, group_size)
    advantages = r - r.mean(1, keepdim=True)
    if scale == "group":
        advantages = advantages / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + eps)
    all_equal = (r == r[:, :1]).all(1, keepdim=True)  # set last: rounding or eps = 0 could leave 1e-8 or 0/0
    return torch.where(all_equal, 0.0, advantages).view(-1)


def completion_mask(completion_ids, eos_ids):
    """1 for tokens up to and including each row's first EOS, 0 after it ([B, T] -> [B, T] float).
    Only the first EOS counts, so padding after it is never mistaken for text, even when the
    pad token is the EOS token. A row without EOS (truncated) is all ones."""
    is_eos = torch.isin(completion_ids, eos_ids).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).float()


def k3_kl(logp, ref_logp):
    """Per-token KL(pi_theta || pi_ref) estimate, k3 = exp(ref - logp) - (ref - logp) - 1
    (DeepSeekMath eq. 4): unbiased for samples from pi_theta and never negative. [B, T] -> [B, T]."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high):
    """Per-token PPO loss -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A), rho =
    exp(logp - old_logp); logp, old_logp [B, T], advantages [B]. Also returns where the clip is
    active: low (rho < 1 - eps_low, A < 0) and high (rho > 1 + eps_high, A > 0), both [B, T] bool."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    loss = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    return loss, (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0)


def loss_denominator(loss_mask, loss_type, max_new_tokens):
    """What a loss type divides the summed per-token loss by, counted on loss_mask [N, T] (this
    rank's rows; sum it over ranks): grpo, the completions in the loss; dapo, their tokens;
    dr_grpo, every completion sampled times max_new_tokens, a constant that does not move when
    DAPO's filters leave completions out (as TRL's dr_grpo: batch rows x max_completion_length)."""
    if loss_type == "grpo":
        return (loss_mask.sum(1) > 0).sum()
    if loss_type == "dapo":
        return loss_mask.sum()
    return torch.tensor(len(loss_mask) * max_new_tokens, device=loss_mask.device)


def aggregate_loss(per_token, mask, loss_type, denominator):
    """Scalar loss from per-token losses [B, T] and mask [B, T]; `denominator` is the whole batch's
    (loss_denominator, summed over micro-batches and ranks), so summing this over micro-batches
    gives exactly the full-batch loss:
      grpo:    sum_i (1/|o_i|) sum_t l_it / completions in the loss   (DeepSeekMath eq. 3)
      dapo:    sum_i sum_t l_it / tokens in the loss                   (DAPO token-level loss)
      dr_grpo: sum_i sum_t l_it / (completions sampled * max_new_tokens)  (Dr. GRPO)"""
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / denominator
    return masked.sum() / denominator


def dapo_filters(mask, zero_std_groups, truncated, drop_zero_std_groups, mask_truncated):
    """The loss mask [N, T]: `mask` with whole completions removed by DAPO's filters: those of
    groups whose rewards are all equal (zero_std_groups [N/G], dynamic sampling) and those that
    never reached EOS (truncated [N], overlong filtering)."""
    keep = torch.ones(len(mask), dtype=torch.bool, device=mask.device)
    if drop_zero_std_groups:
        keep &= ~zero_std_groups.repeat_interleave(len(mask) // len(zero_std_groups))
    if mask_truncated:
        keep &= ~truncated
    return mask * keep[:, None]


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg, denominator):
    """The GRPO objective for one micro-batch: clipped surrogate + beta * k3 KL, aggregated by
    cfg.loss_type over `denominator` (loss_denominator of the whole batch). ref_logp is None when
    beta = 0. Returns (loss, masked sums for logging, as tensors so that nothing waits for the
    device until the step is logged)."""
    per_token, clip_low, clip_high = clipped_surrogate(logp, old_logp, advantages, cfg.clip_eps_low, cfg.clip_eps_high)
    stats = {"clip_low": (clip_low * mask).sum(), "clip_high": (clip_high * mask).sum()}
    if cfg.beta > 0:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + cfg.beta * kl
        stats["kl"] = (kl.detach() * mask).sum()
    return aggregate_loss(per_token, mask, cfg.loss_type, denominator), stats


def lr_factor(step, warmup_steps, total_steps, min_ratio):
    """Linear warmup to 1 over warmup_steps, then cosine decay to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def sync_reference(ref_model, model, alpha):
    """ref <- alpha * theta + (1 - alpha) * ref, parameter by parameter (alpha = 1: hard copy)."""
    for module in (*ref_model.modules(), *model.modules()):
        if hasattr(module, "reshard"):  # FSDP: a root module keeps its gathered weights after forward
            module.reshard()
    for ref_param, param in zip(ref_model.parameters(), model.parameters()):
        ref_param.lerp_(param.detach().to(ref_param.dtype), alpha)


# ----------------------------------------------------------------------------
# model helpers


def load_model(path, device, dtype="float32", attn_implementation="sdpa"):
    """(model, tokenizer) from a hub name or local path, weights in `dtype`. The policy is trained in
    float32 (master weights, bf16 compute under autocast); bfloat16 is for frozen copies (the
    reference model) and inference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                     attn_implementation=attn_implementation).to(device)
    except (OSError, ValueError, KeyError) as err:  # not found, offline, unknown architecture, bad files
        raise ConfigError(f"model: {path}: {str(err).strip().splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model: {path}: the tokenizer has no EOS token, so completions could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: masks count only the first EOS
    return model, tokenizer


def disable_dropout(model):
    """Zero every dropout probability, in modules and in attention (TRL's disable_dropout): the
    sampling and no-grad passes run in eval mode, so with dropout the update would score the
    completions under another policy than the one that drew them."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):  # transformers' attention reads a float while training
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


def stop_ids(model, tokenizer):
    """Every token id that ends a completion: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return torch.tensor(sorted(ids), device=model.device)


def unwrap(model):
    """The transformers model inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}


def can_share_prompts(model):
    """Whether a prompt's cache can be copied to other rows: every layer is attention, whose cache
    is keys and values by row. Hybrid models (LFM2's convolutions, Qwen3-Next's linear attention)
    keep running states that transformers updates in place; they run every row instead."""
    config = getattr(unwrap(model), "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return set(getattr(config, "layer_types", None) or ATTENTION_LAYERS) <= ATTENTION_LAYERS


def prefill_prompts(model, prompt_ids, prompt_mask, share=True):
    """Run each distinct prompt of left-padded prompt_ids [B, P] once (a group's G rows share one
    pass), then copy its KV cache and last logits to every row that has it (gradients flow back
    through the copies); share=False, or a model whose cache cannot be copied, runs every row.
    -> (logits [B, 1, V], the cache as a keyword argument for the next forward call)."""
    import inspect
    from transformers import DynamicCache
    both = torch.cat([prompt_ids, prompt_mask], 1)
    share = share and can_share_prompts(model)
    distinct, rows = torch.unique_consecutive(both, dim=0, return_inverse=True) if share else (both, None)
    ids, mask = distinct.split(prompt_ids.size(1), 1)
    name = "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"
    config = getattr(unwrap(model), "config", None)
    # attention layers (full or sliding) get a cache from the config, in training mode too; a hybrid
    # model builds its own, of the state classes its transformers version has
    given = {name: DynamicCache(config=config)} if share and config is not None else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1, **given)
    cache = getattr(out, "cache", None)  # `cache` in newer transformers, `past_key_values` before
    cache, logits = getattr(out, "past_key_values", None) if cache is None else cache, out.logits
    if cache is None:  # e.g. FalconH1 under transformers 4.x, which only fills a cache it is given
        import transformers
        raise ConfigError(f"model: {type(unwrap(model)).__name__} returns no KV cache under transformers "
                          f"{transformers.__version__}, so it cannot be sampled here (a newer transformers may)")
    if rows is not None and len(distinct) < len(prompt_ids):
        cache.batch_select_indices(rows)
        logits = logits[rows]
    return logits, {name: cache}


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, temperature=1.0, top_p=1.0, uniforms=None,
           share_prompt=True, return_entropy=False):
    """Sample completions for left-padded prompts [B, P] with a KV cache; temperature 0 is greedy.
    uniforms [B, max_new_tokens] in [0, 1) pick the tokens (drawn here when None). Returns [B, T]
    with T <= max_new_tokens (it stops once every row, on every rank, has an EOS); tokens after a
    row's EOS are pad_id. share_prompt: repeated prompts are prefilled once (prefill_prompts).
    return_entropy: also the entropy of softmax(logits / temperature) at each position [B, T],
    the policy's entropy on its own samples, free here (mask it with completion_mask)."""
    if uniforms is None:  # greedy decoding draws none, so that it leaves the random stream as it was
        uniforms = (torch.rand if temperature > 0 else torch.zeros)(len(prompt_ids), max_new_tokens, device=prompt_ids.device)
    logits, cache = prefill_prompts(model, prompt_ids, prompt_mask, share_prompt)
    logits, mask, positions = logits[:, -1], prompt_mask, (prompt_mask.cumsum(1) - 1).clamp(min=0)
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device)
    tokens, entropies = [], []
    for t in range(max_new_tokens):
        logits = logits.float()
        token = pick_token(logits, temperature, top_p, uniforms[:, t])
        if return_entropy:
            entropies.append(torch.special.entr(torch.softmax(logits / temperature, -1)).sum(-1))
        token = torch.where(done, pad_id, token)
        tokens.append(token)
        done |= torch.isin(token, eos_ids)
        # checked every 8 tokens, as each check waits for the device; ranks stop together (FSDP's gathers pair up)
        if t == max_new_tokens - 1 or (t % 8 == 7 and all_sum((~done).sum()).item() == 0):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                       use_cache=True, **cache).logits[:, -1]
    tokens = torch.stack(tokens, 1)
    return (tokens, torch.stack(entropies, 1)) if return_entropy else tokens


def pick_token(logits, temperature, top_p, uniform):
    """One token per row from logits [B, V]: argmax when temperature is 0, else a sample of
    softmax(logits / temperature) restricted to the top_p nucleus, by inverse CDF: the first token
    whose cumulative probability exceeds uniform [B] * total. As the uniforms are drawn per
    completion, a completion does not depend on which rank or batch it is sampled in."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keeps the top token always
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    cdf = probs.cumsum(-1)
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return (cdf <= target).sum(-1).clamp(max=len(cdf[0]) - 1)  # never a token of probability 0


def completion_logprobs(model, input_ids, attention_mask, num_completion, temperature=1.0, share_prompt=False,
                        with_entropy=True):
    """log pi(o_t | q, o_<t) / temperature-scaled, for the last num_completion tokens of
    input_ids [B, L] (left-padded prompt + completion) -> logp [B, C] and entropy [B, C]
    (detached; None unless with_entropy). Logits exist only at completion positions, and
    log-softmax is taken a block of rows at a time (at most 2^24 logits: one row of a large
    vocabulary, a whole batch of a small one), so the full-vocabulary log-probs of a large batch
    are never held at once.
    share_prompt: consecutive rows with the same prompt (a group) share one forward pass over it
    (prefill_prompts); the same result, fewer FLOPs. Not under gradient checkpointing, which
    keeps no KV cache. Whether to share is the caller's choice, not the data's, so that every rank
    makes the same number of forward calls (FSDP gathers weights in each)."""
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    prompt_len = input_ids.size(1) - num_completion
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in unwrap(model).modules())
    if share_prompt and not checkpointed and can_share_prompts(model):
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
        if with_entropy:
            with torch.no_grad():
                entropies.append(torch.special.entr(torch.softmax(block, -1)).sum(-1))
    return torch.cat(logps), torch.cat(entropies) if with_entropy else None


def clock(device):
    """time.perf_counter() once the device has run the work queued on it: GPU kernels launch
    asynchronously, and each phase's (t_sample, t_logprobs, t_update) must be timed with it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def autocast_factory(device, cfg):
    """bf16 autocast over the weights as loaded where cfg.bf16 says: by default on CUDA, and with
    dtype=bfloat16 on any device (bf16 compute, fp32 master weights)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls on tensor cores
    bf16 = (device.type == "cuda" or cfg.dtype == "bfloat16") if cfg.bf16 is None else cfg.bf16
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# ----------------------------------------------------------------------------
# evaluation, cold start, the data order


def correctness(task):
    return R.countdown_reward if task == "countdown" else R.accuracy_reward


@torch.no_grad()
def evaluate(model, tokenizer, examples, cfg, eos_ids, autocast):
    """Held-out metrics: greedy pass@1 `accuracy`, `format` compliance and mean completion
    `length` (tokens); with eval_k > 0 also `pass_at_k` (some of k samples at `temperature` is
    correct) and `sampled_accuracy` (the mean over those samples)."""
    model.eval()
    correct, k = correctness(cfg.task), cfg.eval_k
    names = ["accuracy", "format", "length"] + (["pass_at_k", "sampled_accuracy"] if k else [])
    rank, world = rank_and_world()
    shard = examples[rank::world]  # padded with repeats to the same length on every rank; they do not count
    counted, shard = len(shard), shard + examples[:1] * (-(-len(examples) // world) - len(shard))
    totals = torch.zeros(len(names))
    for start in range(0, len(shard), cfg.eval_batch_size):
        chunk = shard[start:start + cfg.eval_batch_size]
        counts = torch.arange(start, start + len(chunk)) < counted
        ids, mask, _ = data.encode_prompts(tokenizer, chunk, cfg, model.device)
        with autocast():
            out = sample(model, ids, mask, cfg.max_new_tokens, eos_ids, tokenizer.pad_token_id, temperature=0)
        texts = data.decode(tokenizer, out, cfg.prefill)
        row = [[R.safe_reward(correct, t, e)[0], R.format_reward(t, e)] for t, e in zip(texts, chunk)]
        row = torch.cat([torch.tensor(row), completion_mask(out, eos_ids).sum(1, keepdim=True).cpu()], 1)
        if k:
            uniforms = torch.rand(world, len(chunk) * k, cfg.max_new_tokens)[rank].to(model.device)
            with autocast():
                out = sample(model, ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), cfg.max_new_tokens,
                             eos_ids, tokenizer.pad_token_id, cfg.temperature, cfg.top_p, uniforms)
            texts = data.decode(tokenizer, out, cfg.prefill)
            hits = torch.tensor([R.safe_reward(correct, t, chunk[i // k])[0] for i, t in enumerate(texts)]).view(-1, k)
            row = torch.cat([row, (hits.max(1).values > 0).float()[:, None], hits.mean(1, keepdim=True)], 1)
        totals += row[counts].sum(0)
    totals = all_sum(totals) / max(1, len(examples))
    return dict(zip(names, totals.tolist()))


def sft_loss(model, tokenizer, batch, cfg, eos_ids, autocast):
    """-log pi(solution | prompt) per token: the mean over the completion tokens (EOS included) of
    every rank's batch; prompt tokens carry no loss. batch: examples with "question" and
    "solution". Returns (loss, number of completion tokens on all ranks)."""
    prompt_ids, prompt_mask, _ = data.encode_prompts(tokenizer, batch, cfg, model.device)
    completion_ids = data.encode_completions(tokenizer, [e["solution"] for e in batch], model.device)
    ids, attention = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, torch.ones_like(completion_ids)], 1)
    mask = completion_mask(completion_ids, eos_ids)
    with autocast():
        logp, _ = completion_logprobs(model, ids, attention, completion_ids.size(1), with_entropy=False)
    tokens = all_sum(mask.sum())
    return -(logp * mask).sum() / tokens, tokens


def cold_start(model, tokenizer, examples, cfg, eos_ids, autocast, show):
    """DeepSeek-R1's phase 1: supervised fine-tuning on worked solutions, loss on completion
    tokens only (mean token negative log-likelihood). Under torchrun each rank takes its share of
    every batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    rng, (rank, world) = random.Random(cfg.seed), rank_and_world()
    model.train()
    for step in range(cfg.sft_steps):
        batch = rng.sample(examples, min(cfg.sft_batch_size, len(examples)))[rank::world]
        loss, _ = sft_loss(model, tokenizer, batch, cfg, eos_ids, autocast)
        optimizer.zero_grad(set_to_none=True)
        (loss * world).backward()  # DDP and FSDP average gradients over ranks; the loss is already a global mean
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        optimizer.step()
        show(step + 1, cfg.sft_steps, f"sft loss {all_sum(loss.detach()).item():.3f}")


def step_examples(examples, step, count, seed):
    """The questions of GRPO step `step`: the next `count` of a seeded permutation per epoch, so
    the data position is the step number itself and a resumed run sees the same questions."""
    picked = []
    for k in range(step * count, (step + 1) * count):
        epoch, offset = divmod(k, len(examples))
        picked.append(examples[epoch_order(seed, epoch, len(examples))[offset]])
    return picked


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, size):
    return np.random.default_rng([seed, epoch]).permutation(size)


# ----------------------------------------------------------------------------
# one GRPO step, in parts


def score(texts, examples, lengths, reward_spec, cfg):
    """Rewards [N, R] of completion i (question examples[i // G]) under each (name, weight) reward;
    a reward that raises or is not finite scores 0 and is counted. Also the task's correctness."""
    scores, failures, correct = torch.zeros(len(texts), len(reward_spec)), 0, torch.zeros(len(texts))
    for i, text in enumerate(texts):
        context = dict(examples[i // cfg.group_size], completion_tokens=int(lengths[i]), language=cfg.language,
                       max_new_tokens=cfg.max_new_tokens, overlong_buffer=cfg.overlong_buffer)
        for j, (name, _) in enumerate(reward_spec):
            scores[i, j], failed = R.safe_reward(R.REWARDS[name], text, context)
            failures += failed
        correct[i] = R.safe_reward(correctness(cfg.task), text, context)[0]
    return scores, failures, correct


def accumulate_gradients(model, ids, attention, num_completion, advantages, loss_mask, old_logp, ref_logp,
                         cfg, autocast):
    """Backpropagate the whole batch's GRPO loss one micro-batch at a time; the gradient equals
    the full-batch one because every micro-batch is normalised by the whole batch's denominator,
    summed over ranks under torchrun. old_logp None means mu = 1: the detached current log-probs
    stand in (ratio 1, same gradient). Returns this rank's summed loss and masked-token
    statistics (tensors)."""
    denominator = all_sum(loss_denominator(loss_mask, cfg.loss_type, cfg.max_new_tokens)).clamp(min=1)
    world = rank_and_world()[1]
    sums = dict.fromkeys(("loss", "clip_low", "clip_high", "kl"), 0.0)
    for i in range(0, len(ids), cfg.micro_batch_size):
        rows = slice(i, i + cfg.micro_batch_size)
        last = i + cfg.micro_batch_size >= len(ids)  # DDP all-reduces the gradients once, after the last
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast():
                logp, _ = completion_logprobs(model, ids[rows], attention[rows], num_completion, cfg.temperature,
                                              cfg.share_prompt, with_entropy=False)
            loss, stats = grpo_loss(logp, logp.detach() if old_logp is None else old_logp[rows],
                                    None if ref_logp is None else ref_logp[rows], advantages[rows], loss_mask[rows],
                                    cfg, denominator)
            (loss * world).backward()  # ranks' gradients are averaged; the loss already has global normalisers
        stats.update(loss=loss.detach())
        for key, value in stats.items():
            sums[key] += value
    return sums


@torch.no_grad()
def batch_logprobs(model, ids, attention, num_completion, cfg, autocast):
    """Log-probs of a whole batch without gradients (old policy, reference), micro-batch by micro-batch."""
    with autocast():
        return torch.cat([completion_logprobs(model, ids[i:i + cfg.micro_batch_size], attention[i:i + cfg.micro_batch_size],
                                              num_completion, cfg.temperature, cfg.share_prompt, with_entropy=False)[0]
                          for i in range(0, len(ids), cfg.micro_batch_size)])


# ----------------------------------------------------------------------------
# training


def train(cfg):
    wall_start = time.time()
    from transformers.utils import logging
    logging.disable_progress_bar()  # one progress bar is enough: ours
    device = init_distributed(cfg)
    rank, world = rank_and_world()
    main_rank = rank == 0  # prints, logs and saves
    quiet = lambda *args, **kwargs: None  # noqa: E731
    say = print if main_rank else quiet
    autocast = autocast_factory(device, cfg)
    train_set, test_set = data.load_task(cfg.task, cfg.seed, cfg.data_path, cfg.eval_data_path, cfg.eval_size, cfg.digits)
    reward_spec = R.parse_reward_spec(cfg.rewards)
    weights = torch.tensor([w for _, w in reward_spec])
    run_dir, G = cfg.out_dir, cfg.group_size
    if not cfg.resume and not cfg.eval_only and os.path.exists(os.path.join(run_dir, "latest")):
        raise ConfigError(f"out_dir: {run_dir} already holds a run; continue it with --resume={run_dir}, "
                          "or start anew in another --out_dir")
    os.makedirs(run_dir, exist_ok=True)
    kind = "the tiny demo" if cfg.model == "tiny" else "a pretrained model"
    marks = {k: f"  # the default for {kind}" for k, pair in MODEL_DEFAULTS.items() if getattr(cfg, k) == pair[cfg.model != "tiny"]}
    say("config:\n" + "\n".join(f"  {k} = {v!r}{marks.get(k, '')}" for k, v in dataclasses.asdict(cfg).items()))
    if main_rank and not cfg.eval_only:  # an evaluation must not replace the config a run resumes from
        write_atomic(os.path.join(run_dir, "train_config.json"), json.dumps(dataclasses.asdict(cfg), indent=1))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # the policy: built or loaded, then cold-started; or resumed from the latest checkpoint
    state = None
    if cfg.resume:
        state, checkpoint = open_resumed_run(run_dir, clean=main_rank)
        model, tokenizer = load_model(checkpoint, device, "float32", cfg.attn_implementation)
        init_path = state["init_model"]
    else:
        init_path = os.path.join(run_dir, "tiny") if cfg.model == "tiny" else cfg.model
        if cfg.model == "tiny" and main_rank:
            data.build_tiny_model(init_path, cfg.seed)
        barrier()
        # trained weights are float32 whatever dtype says: AdamW's small steps would round away in bf16
        model, tokenizer = load_model(init_path, device, cfg.dtype if cfg.eval_only else "float32", cfg.attn_implementation)
    if cfg.disable_dropout:
        disable_dropout(model)
    cfg = data.resolve_prompt_limit(cfg, model, tokenizer, train_set + test_set)
    eos_ids = stop_ids(model, tokenizer)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_model = distribute(model, cfg, device)  # DDP's wrapper, or `model` itself sharded by FSDP
    if cfg.eval_only:
        result = evaluate(model, tokenizer, test_set, cfg, eos_ids, autocast)
        if main_rank:
            write_atomic(os.path.join(run_dir, "eval.json"),
                         json.dumps(dict(result, model=init_path, config=dataclasses.asdict(cfg)), indent=1))
        say(f"{init_path} on {len(test_set)} held-out questions: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        barrier()
        return result
    if not cfg.resume and cfg.sft_steps:
        solved = [e for e in train_set[:cfg.sft_examples] if "solution" in e]
        if not solved:
            raise ConfigError(f"sft_steps: task {cfg.task} has no worked solutions for a cold start")
        cold_start(train_model, tokenizer, solved, cfg, eos_ids, autocast, Progress("cold start") if main_rank else quiet)
        init_path, weights_now = os.path.join(run_dir, "cold_start"), full_state(model)
        if main_rank:
            model.save_pretrained(init_path, state_dict=weights_now)
            tokenizer.save_pretrained(init_path)
        barrier()
    ref_model = None
    if cfg.beta > 0:  # with beta = 0 no reference model is loaded at all
        ref_model = load_model(init_path, device, cfg.dtype, cfg.attn_implementation)[0].eval().requires_grad_(False)
        if state and "ref_model" in state:
            ref_model.load_state_dict(state["ref_model"])
        ref_model = distribute(ref_model, cfg, device, trainable=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
    warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))  # skipped steps: the schedule goes on
    train_model = torch.compile(train_model, dynamic=True) if cfg.compile else train_model
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if state:
        load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        start_step, before, (bad_steps, skipped_steps) = state["step"], state["eval_before"], state["bad_steps"]
    else:
        start_step, bad_steps, skipped_steps = 0, 0, 0
        before = evaluate(model, tokenizer, test_set, cfg, eos_ids, autocast) if cfg.eval_size else {}
        if main_rank:
            write_atomic(metrics_path, "")
        if before:
            say(f"before RL: greedy accuracy {before['accuracy']:.1%} on {len(test_set)} held-out questions")
    if cfg.wandb and main_rank:
        import wandb
        wandb.init(project="grpo", name=os.path.basename(os.path.abspath(run_dir)), config=dataclasses.asdict(cfg))
    show, rl_start = Progress("grpo") if main_rank else quiet, time.time()
    P = cfg.prompts_per_step // world  # this rank's questions; its completions are rows `mine` of the step's
    mine, my_groups = slice(rank * P * G, (rank + 1) * P * G), slice(rank * P, (rank + 1) * P)

    with stop_signals() as signals:
        for step in range(start_step, cfg.max_steps):
            # 1. sample G completions for each question of this step
            t0 = time.perf_counter()
            examples = step_examples(train_set, step, cfg.prompts_per_step, cfg.seed)[my_groups]
            uniforms = torch.rand(cfg.prompts_per_step * G, cfg.max_new_tokens)[mine].to(device)  # one stream, all ranks
            prompt_ids, prompt_mask, prompts_cut = data.encode_prompts(tokenizer, examples, cfg, device)
            prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
            model.eval()
            with autocast():
                completion_ids, entropies = sample(model, prompt_ids, prompt_mask, cfg.max_new_tokens, eos_ids,
                                                   tokenizer.pad_token_id, cfg.temperature, cfg.top_p, uniforms,
                                                   cfg.share_prompt, return_entropy=True)
            mask = completion_mask(completion_ids, eos_ids)
            lengths, truncated = mask.sum(1), ~torch.isin(completion_ids, eos_ids).any(1)
            texts = data.decode(tokenizer, completion_ids, cfg.prefill)
            t1 = clock(device)

            # 2. rewards, group-relative advantages, and which completions the loss sees
            scores, failures, correct = score(texts, examples, lengths, reward_spec, cfg)
            scores, correct = gather(scores), gather(correct)  # every rank sees the whole step from here on
            rewards = scores @ weights
            advantages = group_advantages(rewards, G, cfg.scale_rewards, cfg.adv_eps)[mine].to(device)
            zero_std = (rewards.view(-1, G) == rewards.view(-1, G)[:, :1]).all(1)
            loss_mask = dapo_filters(mask, zero_std[my_groups].to(device), truncated, cfg.drop_zero_std_groups,
                                     cfg.mask_truncated)

            # 3. old and reference log-probs: one no-grad pass each, only when needed
            ids = torch.cat([prompt_ids, completion_ids], 1)
            attention = torch.cat([prompt_mask, torch.ones_like(completion_ids)], 1)
            C = completion_ids.size(1)
            old_logp = batch_logprobs(train_model, ids, attention, C, cfg, autocast) if cfg.num_iterations > 1 else None
            ref_logp = batch_logprobs(ref_model, ids, attention, C, cfg, autocast) if ref_model is not None else None
            t2 = clock(device)

            # 4. mu policy updates on this batch (none when the loss sees no token)
            model.train()
            sums, grad_norm = dict.fromkeys(("loss", "clip_low", "clip_high", "kl"), 0.0), None
            skipped, updates = False, 0
            for _ in range(cfg.num_iterations if all_sum(loss_mask.sum()).item() > 0 else 0):
                optimizer.zero_grad(set_to_none=True)
                stats = accumulate_gradients(train_model, ids, attention, C, advantages, loss_mask, old_logp, ref_logp,
                                             cfg, autocast)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP
                if not (math.isfinite(norm) and math.isfinite(all_sum(stats["loss"]))):  # leave weights, Adam alone
                    optimizer.zero_grad(set_to_none=True)
                    skipped = True
                    break
                sums, grad_norm = {k: sums[k] + v for k, v in stats.items()}, float(norm)
                optimizer.step()
                updates += 1
            bad_steps, skipped_steps = (bad_steps + 1 if skipped else 0), skipped_steps + skipped
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            synced = ref_model is not None and cfg.ref_sync_every > 0 and (step + 1) % cfg.ref_sync_every == 0
            if synced:
                sync_reference(ref_model, model, cfg.ref_sync_alpha)
            t3 = clock(device)

            # 5. log, evaluate, checkpoint: one all-reduce brings every rank's sums to all (and to the host)
            counts = [loss_mask.sum(), mask.sum(), (entropies * mask).sum(), torch.tensor(failures),
                      torch.tensor(prompts_cut), torch.tensor(sum(map(R.reflects, texts)))]
            totals = all_sum(torch.stack([torch.as_tensor(v, dtype=torch.float32).to(device)
                                          for v in [*sums.values(), *counts]])).tolist()
            sums, (loss_tokens, tokens, entropy, failures, prompts_cut, reflecting) = dict(zip(sums, totals)), totals[len(sums):]
            lengths, truncated = gather(lengths.float()), gather(truncated.float())
            # per loss token and update; null when no update was made (no token in the loss, or skipped)
            per_token = {k: v / (max(1.0, loss_tokens) * updates) if updates else None for k, v in sums.items()}
            row = {"step": step + 1, "lr": lr, "loss": sums["loss"] / updates if updates else None,
                   "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
                   **{f"reward_{name}": scores[:, j].mean().item() for j, (name, _) in enumerate(reward_spec)},
                   "accuracy": correct.mean().item(), "zero_std_frac": zero_std.float().mean().item(),
                   "completion_len_mean": lengths.mean().item(), "completion_len_max": int(lengths.max()),
                   "truncated_frac": truncated.mean().item(), "reflection_frac": reflecting / len(rewards),
                   "kl": per_token["kl"] if ref_model is not None else None, "clip_low_frac": per_token["clip_low"],
                   "clip_high_frac": per_token["clip_high"], "entropy": entropy / tokens, "grad_norm": grad_norm,
                   "updates": updates, "reward_errors": int(failures),
                   "ref_synced": synced, "skipped": skipped, "skipped_total": skipped_steps, "prompts_cut": int(prompts_cut),
                   "tokens_per_sec": tokens / (t3 - t0), "t_sample": t1 - t0, "t_logprobs": t2 - t1, "t_update": t3 - t2}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                row.update({f"eval_{k}": v for k, v in evaluate(model, tokenizer, test_set, cfg, eos_ids, autocast).items()})
            if main_rank:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if cfg.wandb:
                    wandb.log(row, step=step + 1)
            show(step + 1, cfg.max_steps, f"reward {row['reward_mean']:.2f} acc {row['accuracy']:.2f} "
                                          f"len {row['completion_len_mean']:.1f}")
            if main_rank and cfg.log_samples_every and (step + 1) % cfg.log_samples_every == 0:
                for g in range(min(2, P)):
                    print(f"  [step {step + 1}] {examples[g]['question'][:200]!r} -> {texts[g * G][:300]!r} "
                          f"(reward {rewards[g * G]:.2f}, answer {examples[g]['answer']})", file=sys.stderr)
            signalled = all_sum(torch.tensor(len(signals))).item() > 0  # a signal to any rank stops them all
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or signalled or bad_steps >= cfg.max_bad_steps:
                state = {"step": step + 1, "optimizer": full_state(model, optimizer), "scheduler": scheduler.state_dict(),
                         "rng": rng_state(), "init_model": init_path, "eval_before": before,
                         "bad_steps": (bad_steps, skipped_steps), "config": dataclasses.asdict(cfg)}
                if ref_model is not None and cfg.ref_sync_every > 0:
                    state["ref_model"] = full_state(ref_model) or ref_model.state_dict()
                weights_now = full_state(model)  # under FSDP every rank sends its shards; rank 0 writes
                if main_rank:
                    save_checkpoint(run_dir, step + 1, model, tokenizer, state, cfg.keep_checkpoints, weights_now)
                barrier()
            if signalled:
                number = signals[0] if signals else signal.SIGTERM
                raise Stop(f"stopped by {signal.Signals(number).name} after step {step + 1}, checkpoint saved; "
                           f"continue with --resume={run_dir}", 128 + number)
            if bad_steps >= cfg.max_bad_steps:
                raise Stop(f"{bad_steps} steps in a row had a non-finite loss or gradient and were skipped; stopped "
                           f"after step {step + 1} with a checkpoint of the last good weights (lower lr, check the "
                           "rewards and data, or raise max_bad_steps)", 1)

    # cleanup: the final evaluation and the summary
    rl_seconds = time.time() - rl_start
    after = evaluate(model, tokenizer, test_set, cfg, eos_ids, autocast) if cfg.eval_size else {}
    summary = {"accuracy_before": before.get("accuracy"), "accuracy_after": after.get("accuracy"),
               "format_before": before.get("format"), "format_after": after.get("format"),
               "length_before": before.get("length"), "length_after": after.get("length"),
               "eval_questions": len(test_set) if cfg.eval_size else 0, "steps": cfg.max_steps, "ranks": world,
               "rl_seconds": rl_seconds, "wall_seconds": time.time() - wall_start, "run_dir": os.path.abspath(run_dir)}
    if main_rank:
        write_atomic(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=1))
    say("\n---- summary")
    if after:
        say(f"held-out greedy accuracy: {before['accuracy']:.1%} before RL -> {after['accuracy']:.1%} after "
            f"{cfg.max_steps} GRPO steps ({100 * (after['accuracy'] - before['accuracy']):+.1f} points)")
        say(f"format compliance: {before['format']:.1%} -> {after['format']:.1%}")
    say(f"wall time {summary['wall_seconds']:.0f}s (GRPO {rl_seconds:.0f}s); run directory {summary['run_dir']}")
    say("  metrics.jsonl (a row per step), summary.json, the final model: from_pretrained(run directory)")
    barrier()  # ranks leave together: a process group torn down while another rank still uses it aborts
    return summary


def main(argv):
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *args, **kwargs: None)  # torchrun: rank 0 speaks
    try:
        train(parse_config(argv))
    except (ConfigError, data.DataError) as err:
        say(f"grpo.py: error: {err}", file=sys.stderr)
        return 2
    except Stop as stop:  # every rank stops at the same step
        barrier()
        say(f"grpo.py: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # outside the loop; checkpoints are renamed into place whole, so the latest is intact
        say("\ngrpo.py: interrupted; continue with --resume=OUT_DIR from its latest checkpoint", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if "WORLD_SIZE" in os.environ:  # torchrun: skip interpreter teardown, where gloo's threads can abort (~1 exit in 10)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
