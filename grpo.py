"""
grpo.py: Group Relative Policy Optimization in one file.

GRPO (DeepSeekMath, arXiv 2402.03300) trains a causal LM from rule-based rewards without a value
model: for each question it samples a group of G completions, scores them, and uses each
completion's reward relative to its group, A_i = (r_i - mean(r)) / (std(r) + eps), as the
advantage of every one of its tokens in a PPO-style clipped objective, with a k3 KL penalty
towards a frozen reference model. Read top to bottom: config, the math as pure functions, the
supervised and evaluation passes, then the training loop. The model as a sequence model (loading,
sampling, log-probs) is in engine.py; run plumbing that computes nothing (torchrun, checkpoints,
signals, progress) in runs.py; config parsing in configurator.py; templates and tasks in data.py.

Where it departs from or extends the paper (each one a flag, paper default first):
  - scale_rewards=group|batch|none   none is Dr. GRPO (arXiv 2503.20783); unbiased std
  - loss_type=grpo|dapo|dr_grpo      per-sequence mean (paper), token mean (DAPO), constant
                                      (completions sampled x max_new_tokens, filtered or not, as TRL)
  - clip_eps_high                     DAPO's clip-higher (arXiv 2503.14476) when > clip_eps_low
  - newer objectives, each a flag:    importance_sampling_level=sequence (GSPO), loss_type=cispo
    (CISPO), advantage=rloo|reinforce_pp (RLOO, REINFORCE++), delta (INTELLECT-2), entropy_coef
  - mask_truncated, drop_zero_std_groups, the overlong reward: DAPO's other three changes
  - log-probs are taken at the sampling temperature, so the ratio compares the sampled policy
  - sft_steps: a short cold-start SFT on worked solutions before RL (DeepSeek-R1's phase 1);
    R1's other phases (SFT on pairs, rejection sampling, distillation) are in r1.py
  - sampling draws one uniform per token and completion and inverts the CDF, so that a
    completion is the same on 1 or N ranks (torchrun: groups are split across ranks)
  - share_prompt: a group's G sequences share one forward pass over their prompt, whose KV
    cache is copied to each (sampling's prefill, the reference and update passes): same result
  - sampling uses the engine's static KV cache where the family allows (decoder); the sampler's
    own log-probs are compared with the trainer's each step, and tis_cap corrects for a gap
  - weights train in fp32 (dtype=bfloat16: bf16 compute over fp32 master weights, as AdamW's
    small steps round away in bf16); dropout is off (disable_dropout); the demo's schedule
    (cold start, lr 3e-4) applies to model="tiny" only, a pretrained model gets lr 1e-6

Commands:
  python grpo.py                                   # offline CPU demo: tiny model, SFT, GRPO, before/after
  python grpo.py --config configs/gsm8k_qwen.py    # one GPU (bf16 autocast on CUDA)
  torchrun --nproc_per_node=8 grpo.py --config configs/gsm8k_qwen.py   # 8 GPUs, DDP (--sharding=fsdp shards)
  python grpo.py --config configs/NAME.py --max_steps=100 --lr=1e-6   # overrides follow the file
  python grpo.py --config configs/gsm8k_qwen.py --lora_rank=16 --dtype=bfloat16   # LoRA on a bf16 base (peft)
  python grpo.py --resume=runs/default             # continue from the latest checkpoint
  python grpo.py --config configs/gsm8k_qwen.py --model=runs/gsm8k_qwen --eval_only=True --eval_k=8
  python grpo.py --help                            # every flag with its default and paper value
"""
import dataclasses
import json
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch

import data
import rewards as R
import runs
from configurator import ConfigError, parse_args
from engine import Engine, WithoutAdapters, add_lora, disable_dropout, load_model, merged_weights
from runs import Stop, all_sum, barrier, gather, my_share, say

# ----------------------------------------------------------------------------
# config: defaults -> --config FILE -> --key=value; the defaults are the CPU demo


@dataclass
class Config:
    # run
    model: str = "tiny"            # hub name or local path; "tiny" builds a ~1M-param Llama locally
    task: Literal[tuple(data.TASKS)] = "arithmetic"  # the task (data.TASKS); gsm8k and jsonl read data_path
    data_path: str = ""            # training JSONL (or hub dataset) for gsm8k / jsonl
    eval_data_path: str = ""       # held-out JSONL (its first eval_size rows); "" holds out data_path's first eval_size
    template: Literal[data.TEMPLATES] = "plain"  # prompt template (R1-Zero: r1zero)
    system_prompt: Optional[str] = None  # chat: the system message; None = R1's format instruction, "" = none
    prefill: str = ""              # text the answer starts with, after the prompt (R1: "<think>"); rewards see it
    digits: int = 2                # arithmetic: digits per operand
    out_dir: str = "runs/default"  # run directory: config, metrics, checkpoints, summary
    resume: str = ""               # run directory to continue from its latest checkpoint
    seed: int = 0                  # seeds data split, init, sampling; CPU runs are reproducible
    device: str = "auto"           # auto | cpu | cuda | cuda:N (under torchrun: each rank's LOCAL_RANK GPU)
    sharding: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: ddp keeps a full copy per rank, fsdp shards weights, grads, Adam state
    dtype: Literal["float32", "bfloat16"] = "float32"  # the policy trains in fp32 either way; bfloat16 = bf16 compute, bf16 reference
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # flash_attention_2 needs flash-attn
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
    decoder: Literal["auto", "static", "hf"] = "auto"  # static: engine-owned KV cache (Llama, Qwen2/3, Mistral); auto: where it runs
    compile_decode: Optional[bool] = None  # torch.compile the static decode step (CUDA graphs on CUDA); None = on CUDA
    max_prompt_tokens: int = 0     # longer prompts keep their last tokens; 0 = context - max_new_tokens
    prompt_overflow: Literal["truncate", "reject"] = "truncate"  # a prompt over max_prompt_tokens: cut (counted) | stop at start
    # rewards
    rewards: str = "accuracy:1,format:0.5"  # name:weight from rewards.REWARDS, or FILE.py:FUNCTION:weight (R1-Zero: accuracy + format)
    overlong_buffer: int = 0       # L_cache of the overlong reward (DAPO: 4096 of 20480 tokens)
    language: str = "en"           # target script of the language reward (R1: the prompt's language)
    # objective
    advantage: Literal["grpo", "rloo", "reinforce_pp"] = "grpo"  # baseline: group mean | leave-one-out (RLOO) | group mean, batch-whitened (REINFORCE++)
    scale_rewards: Literal["group", "batch", "none"] = "group"  # std that divides grpo/rloo advantages (Dr. GRPO, RLOO: none)
    adv_eps: float = 1e-4          # eps in (r - mean) / (std + eps)
    importance_sampling_level: Literal["token", "sequence"] = "token"  # ratio per token | per sequence (GSPO: clip 3e-4/4e-4)
    clip_eps_low: float = 0.2      # ratio clipped below at 1 - eps_low (DeepSeekMath: 0.2; GSPO: 3e-4)
    clip_eps_high: Optional[float] = None  # above at 1 + eps_high; None = eps_low (DAPO: 0.28; GSPO: 4e-4)
    delta: float = 0.0             # cap of the unclipped ratio, binding for A < 0; 0 = off (INTELLECT-2: 4)
    beta: float = 0.04             # k3 KL coefficient; 0 loads no reference model (DeepSeekMath: 0.04)
    loss_type: Literal["grpo", "dapo", "dr_grpo", "cispo"] = "grpo"  # per-sequence mean | token mean (DAPO) | constant (Dr. GRPO) | CISPO (MiniMax-M1)
    cispo_cap: float = 5.0         # loss_type=cispo: the detached importance weight is capped here (ScaleRL: 5; TRL: epsilon_high)
    entropy_coef: float = 0.0      # entropy bonus: minus coef x mean token entropy; 0 = off (PPO's bonus; DeepSeekMath: none)
    num_iterations: int = 1        # mu: policy updates per batch of samples (DeepSeekMath: 1)
    ref_sync_every: int = 0        # steps between reference updates; 0 = fixed (DeepSeekMath iterative RL)
    ref_sync_alpha: float = 1.0    # ref <- alpha * theta + (1 - alpha) * ref; 1.0 = hard copy
    tis_cap: float = 0.0           # truncated importance sampling: weigh tokens by min(pi_old / pi_sampler, cap); 0 = off
    mask_truncated: bool = False   # leave completions without EOS out of the loss (DAPO: True)
    drop_zero_std_groups: bool = False  # leave groups with equal rewards out (DAPO: True, resampled)
    # LoRA (needs peft): adapters on a frozen base
    lora_rank: int = 0             # rank r of the adapters; 0 = train every weight (LoRA, arXiv 2106.09685: 1-64)
    lora_alpha: float = 32.0       # the adapters' update is scaled by alpha / rank (peft's default: 8)
    lora_dropout: float = 0.0      # dropout on the adapters' input; > 0 needs disable_dropout=False
    lora_target_modules: str = "all-linear"  # all-linear (every linear layer but the head), or names: q_proj,v_proj
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
    log_samples_every: int = 200   # steps between sample completions printed and written to samples.jsonl; 0 = never
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
AT_LEAST_ONE = ("max_steps", "prompts_per_step", "max_new_tokens", "micro_batch_size", "num_iterations",
                "eval_batch_size", "save_every", "keep_checkpoints", "sft_batch_size", "max_bad_steps", "digits")
# what a resumed checkpoint cannot honour: the model it started from, the cold start it had, its adapters
RESUME_FIXED = ("model", "seed", "sft_steps", "sft_examples", "sft_batch_size", "sft_lr", "lora_rank", "lora_alpha",
                "lora_dropout", "lora_target_modules")
NON_NEGATIVE = ("clip_eps_low", "clip_eps_high", "beta", "adv_eps", "lr", "sft_lr", "weight_decay", "grad_clip",
                "warmup_steps", "sft_steps", "sft_examples", "eval_size", "eval_every", "log_samples_every",
                "ref_sync_every", "overlong_buffer", "max_prompt_tokens", "eval_k", "tis_cap", "delta",
                "entropy_coef", "lora_rank")


def parse_config(argv, cls=Config):
    """defaults -> --config FILE -> --key=value (or --resume=DIR: that run's config), validated."""
    cfg = parse_args(cls, argv, runs.saved_config, RESUME_FIXED)
    if cfg.resume and any(arg.startswith("--out_dir=") for arg in argv) and cfg.out_dir != cfg.resume:
        raise ConfigError("out_dir: a resumed run continues in its own directory, --resume's; leave out --out_dir")
    if cfg.resume:
        cfg.out_dir = cfg.resume
    if cfg.clip_eps_high is None:
        cfg.clip_eps_high = cfg.clip_eps_low
    validate(cfg)
    return cfg


def validate(cfg):
    """Refuse impossible values before anything loads, naming the key (choices and types are
    checked when the config is parsed)."""
    ranks, gpus = int(os.environ.get("WORLD_SIZE", "1")), runs.cuda_devices()
    hub_hint = "" if runs.installed("datasets") else " (hub datasets need the `datasets` package)"
    checks = [(getattr(cfg, k) >= 1, f"{k}: must be at least 1") for k in AT_LEAST_ONE]
    checks += [(getattr(cfg, k) >= 0, f"{k}: must not be negative") for k in NON_NEGATIVE]
    checks += [
        (cfg.group_size >= 2, "group_size: must be at least 2 (advantages compare completions within a group)"),
        (cfg.clip_eps_low < 1, "clip_eps_low: must be below 1 (the ratio is clipped at 1 - clip_eps_low)"),
        (not cfg.delta or cfg.delta > 1 + cfg.clip_eps_high,
         f"delta: {cfg.delta} must exceed 1 + clip_eps_high ({1 + cfg.clip_eps_high:g}), or be 0 (off)"),
        (not cfg.delta or cfg.loss_type != "cispo", "delta: caps the clipped objective's ratio; loss_type=cispo has none"),
        (cfg.cispo_cap > 0, "cispo_cap: must be positive"),
        (not cfg.lora_rank or runs.installed("peft"), "lora_rank: LoRA needs the peft package (pip install peft)"),
        (not cfg.lora_rank or cfg.sharding == "ddp", "lora_rank: LoRA runs with sharding=ddp (an adapter is small)"),
        (not cfg.lora_rank or not cfg.ref_sync_every, "ref_sync_every: with LoRA the reference is the base model "
                                                      "with adapters off, which cannot move; use 0"),
        (cfg.lora_alpha > 0, "lora_alpha: must be positive"),
        (0 <= cfg.lora_dropout < 1, "lora_dropout: must be in [0, 1)"),
        (not cfg.lora_dropout or not cfg.disable_dropout, "lora_dropout: dropout needs disable_dropout=False "
                                                          "(the update would score another policy than sampled)"),
        (cfg.temperature > 0, "temperature: must be positive"),
        (0 <= cfg.seed < 2**32, f"seed: {cfg.seed} is not in [0, 2^32 - 1]"),
        (not runs.unwritable(cfg.out_dir), f"out_dir: {cfg.out_dir}: {runs.unwritable(cfg.out_dir)}"),
        (not (cfg.resume and cfg.eval_only), "eval_only: evaluate a run with --model=RUN_DIR --eval_only=True, "
                                             "not with --resume"),
        (cfg.digits <= 3, "digits: at most 3 (every pair of operands is enumerated)"),
        (0 < cfg.top_p <= 1, "top_p: must be in (0, 1]"),
        (0 < cfg.ref_sync_alpha <= 1, "ref_sync_alpha: must be in (0, 1]"),
        (0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio: must be in [0, 1]"),
        (len(cfg.adam_betas) == 2 and all(0 <= b < 1 for b in cfg.adam_betas), "adam_betas: two numbers in [0, 1)"),
        (cfg.language in R.SCRIPTS, f"language: {cfg.language!r} is not one of {', '.join(R.SCRIPTS)}"),
        (cfg.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", cfg.device), f"device: {cfg.device!r} is not auto, cpu or cuda[:N]"),
        (not cfg.device.startswith("cuda") or gpus > int(cfg.device.partition(":")[2] or 0),
         f"device: {cfg.device!r}, but " + (f"this machine has {gpus} CUDA device(s)" if gpus else
                                           "torch sees no CUDA device here (a CPU build, or no GPU); use --device=cpu")),
        (cfg.dtype != "bfloat16" or cfg.bf16 is not False, "bf16: dtype=bfloat16 computes in bf16; bf16=False contradicts it"),
        (not data.TASKS[cfg.task].needs_file or cfg.data_path, f"data_path: task {cfg.task} needs a JSONL file"),
        *[(not path or os.path.isfile(path) or data.is_hub_dataset(path), f"{key}: {path}: no such file{hub_hint}")
      for key, path in (("data_path", cfg.data_path), ("eval_data_path", cfg.eval_data_path))],
        (not cfg.model.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(cfg.model)),
         f"model: {cfg.model}: no such directory"),
        (not cfg.wandb or runs.installed("wandb"), "wandb: the wandb package is not installed"),
        (cfg.attn_implementation != "flash_attention_2" or runs.installed("flash_attn"),
         "attn_implementation: flash_attention_2 needs the flash-attn package"),
        (cfg.prompts_per_step % ranks == 0, f"prompts_per_step: {cfg.prompts_per_step} does not divide among "
                                            f"{ranks} ranks (each rank samples whole groups)"),
        (cfg.sft_steps == 0 or cfg.sft_batch_size % ranks == 0,
         f"sft_batch_size: {cfg.sft_batch_size} does not divide among {ranks} ranks"),
    ]
    try:
        R.parse_reward_spec(cfg.rewards)
    except ValueError as err:
        checks.append((False, f"rewards: {err}"))
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ConfigError(problems[0])


# ----------------------------------------------------------------------------
# the math: pure functions on tensors


def group_advantages(rewards, group_size, scale="group", eps=1e-4, kind="grpo"):
    """Advantages [N] from rewards [N] of N/G consecutive groups of G completions.
    kind: grpo   A_i = (r_i - mean_group(r)) / (std + eps)                       (DeepSeekMath)
          rloo   A_i = r_i - mean of the group's other G-1 rewards, / (std + eps)  (RLOO, arXiv 2402.14740)
          reinforce_pp  B_i = r_i - mean_group(r), then whitened over the whole batch:
                 A_i = (B_i - mean(B)) / (std(B) + eps)       (REINFORCE++ with baseline, arXiv 2501.03262)
    scale (grpo and rloo): group = std of the group, batch = std of all N rewards, none = no
    division (Dr. GRPO; RLOO's paper). std is unbiased. A group whose rewards are all equal gets
    exactly 0, never NaN."""
    r = rewards.view(-1, group_size)
    if kind == "rloo":
        advantages = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    else:
        advantages = r - r.mean(1, keepdim=True)
    if kind == "reinforce_pp":
        advantages = (advantages - advantages.mean()) / (advantages.std() + eps)
    elif scale == "group":
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


def importance_log_ratio(logp, old_logp, mask, level="token"):
    """log rho [B, T] of logp, old_logp [B, T] over the completion tokens in mask [B, T].
    token:    log rho_t = logp_t - old_logp_t                        (PPO, GRPO)
    sequence: log s_i = (1/|o_i|) sum_t (logp_t - old_logp_t), the log of the geometric mean of
              the token ratios, the same for every token of the row (GSPO, arXiv 2507.18071)."""
    log_ratio = logp - old_logp
    if level == "sequence":
        mean = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        log_ratio = mean.expand_as(log_ratio)
    return log_ratio


def clipped_surrogate(log_ratio, advantages, eps_low, eps_high, delta=0.0):
    """Per-token PPO loss -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A), rho =
    exp(log_ratio) [B, T], advantages [B]. delta > 0 also caps the unclipped term: min(rho, delta) * A,
    which only binds for A < 0 (INTELLECT-2's two-sided clip, arXiv 2505.07291). Also returns where
    the clip is active: low (rho < 1 - eps_low, A < 0) and high (rho > 1 + eps_high, A > 0), [B, T] bool."""
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    unclipped = ratio.clamp(max=delta) if delta else ratio
    loss = -torch.min(unclipped * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    return loss, (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0)


def cispo_surrogate(logp, log_ratio, advantages, cap):
    """CISPO's per-token loss -sg(min(rho, cap)) * A * logp (MiniMax-M1, arXiv 2506.13585): the
    importance weight is clipped and detached, not the update, so every token keeps a gradient.
    logp, log_ratio [B, T], advantages [B] -> (loss, no low clip, capped: rho > cap), [B, T] each."""
    ratio = torch.exp(log_ratio)
    loss = -ratio.clamp(max=cap).detach() * advantages[:, None] * logp
    return loss, torch.zeros_like(ratio, dtype=torch.bool), ratio > cap


def loss_denominator(loss_mask, loss_type, max_new_tokens):
    """What a loss type divides the summed per-token loss by, counted on loss_mask [N, T] (this
    rank's rows; sum it over ranks): grpo, the completions in the loss; dapo, their tokens;
    dr_grpo, every completion sampled times max_new_tokens, a constant that does not move when
    DAPO's filters leave completions out (as TRL's dr_grpo: batch rows x max_completion_length);
    cispo, the tokens (as dapo)."""
    if loss_type == "grpo":
        return (loss_mask.sum(1) > 0).sum()
    if loss_type in ("dapo", "cispo"):
        return loss_mask.sum()
    return torch.tensor(len(loss_mask) * max_new_tokens, device=loss_mask.device)


def aggregate_loss(per_token, mask, loss_type, denominator):
    """Scalar loss from per-token losses [B, T] and mask [B, T]; `denominator` is the whole batch's
    (loss_denominator, summed over micro-batches and ranks), so summing this over micro-batches
    gives exactly the full-batch loss:
      grpo:    sum_i (1/|o_i|) sum_t l_it / completions in the loss   (DeepSeekMath eq. 3)
      dapo, cispo: sum_i sum_t l_it / tokens in the loss               (DAPO token-level loss)
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


def truncated_is_weight(old_logp, sampler_logp, cap):
    """Truncated importance sampling (TIS) for tokens drawn by a sampler that differs slightly from
    the trained policy (another kernel, precision or batch shape): w = min(pi_old / pi_sampler, cap)
    per token, [B, T] -> [B, T], detached; it multiplies the clipped surrogate (as TRL's
    vllm_importance_sampling_correction does)."""
    return torch.exp(old_logp - sampler_logp).clamp(max=cap).detach()


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg, denominator, is_weight=None, entropy=None,
              loss_tokens=1):
    """The objective for one micro-batch: the policy term (the clipped surrogate, or CISPO's with
    loss_type=cispo) on the ratio at cfg.importance_sampling_level, times is_weight when given,
    + beta * k3 KL, aggregated by cfg.loss_type over `denominator` (loss_denominator of the whole
    batch); with entropy [B, T] (entropy_coef > 0), minus entropy_coef * the mean entropy over the
    whole batch's loss_tokens, the same bonus whatever the loss type (as TRL). ref_logp is None
    when beta = 0. Returns (loss, masked sums for logging, as tensors so that nothing waits for
    the device until the step is logged)."""
    log_ratio = importance_log_ratio(logp, old_logp, mask, cfg.importance_sampling_level)
    if cfg.loss_type == "cispo":
        per_token, clip_low, clip_high = cispo_surrogate(logp, log_ratio, advantages, cfg.cispo_cap)
    else:
        per_token, clip_low, clip_high = clipped_surrogate(log_ratio, advantages, cfg.clip_eps_low,
                                                           cfg.clip_eps_high, cfg.delta)
    per_token = per_token if is_weight is None else per_token * is_weight
    stats = {"clip_low": (clip_low * mask).sum(), "clip_high": (clip_high * mask).sum()}
    if cfg.beta > 0:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + cfg.beta * kl
        stats["kl"] = (kl.detach() * mask).sum()
    loss = aggregate_loss(per_token, mask, cfg.loss_type, denominator)
    if entropy is not None:
        loss = loss - cfg.entropy_coef * (entropy * mask).sum() / loss_tokens
    return loss, stats


def lr_factor(step, warmup_steps, total_steps, min_ratio):
    """Linear warmup to 1 over warmup_steps, then cosine decay to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@torch.no_grad()
def sync_reference(ref_model, model, alpha):
    """ref <- alpha * theta + (1 - alpha) * ref, parameter by parameter (alpha = 1: hard copy)."""
    runs.reshard(ref_model, model)
    for ref_param, param in zip(ref_model.parameters(), model.parameters()):
        ref_param.lerp_(param.detach().to(ref_param.dtype), alpha)


# ----------------------------------------------------------------------------
# supervised fine-tuning and evaluation


def correctness(task):
    """The reward that judges an answer right under `task` (data.TASKS): the `accuracy` metric."""
    return R.REWARDS[data.TASKS[task].correct]


def sft_loss(engine, batch, cfg, model=None):
    """-log pi(solution | prompt) per token: the mean over the completion tokens (EOS included) of
    every rank's batch; prompt tokens carry no loss. batch: examples with "question" and
    "solution". Returns (loss, number of completion tokens on all ranks)."""
    device = engine.model.device
    prompt_ids, prompt_mask, _ = data.encode_prompts(engine.tokenizer, batch, cfg, device)
    completion_ids = data.encode_completions(engine.tokenizer, [e["solution"] for e in batch], device)
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, torch.ones_like(completion_ids)], 1)
    mask = completion_mask(completion_ids, engine.eos_ids)
    logp = engine.logprobs(ids, attention, completion_ids.size(1), model=model, share_prompt=False)
    tokens = all_sum(mask.sum())
    return -(logp * mask).sum() / tokens, tokens


def sft(model, engine, examples, cfg, steps, lr, warmup_steps=0, min_lr_ratio=1.0, on_step=None):
    """Supervised fine-tuning of `model` (the policy or its DDP wrapper) with loss on completion
    tokens only: `steps` batches of sft_batch_size examples drawn at random (seeded), AdamW at `lr`
    with linear warmup and cosine decay to min_lr_ratio (1.0: constant, the cold start). A step with
    a non-finite gradient leaves the weights as they were. Under torchrun each rank takes its share
    of every batch. on_step(step, metrics row, optimizer) runs after each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    model.train()
    for step in range(steps):
        batch = rng.sample(examples, min(cfg.sft_batch_size, len(examples)))
        loss, tokens = sft_loss(engine, runs.strided_share(batch), cfg, model)
        optimizer.zero_grad(set_to_none=True)
        runs.backward(loss)
        grad_norm = runs.clip_grad_norm(model, cfg.grad_clip)
        lr_now = set_lr(optimizer, lr * lr_factor(step, warmup_steps, steps, min_lr_ratio))
        if math.isfinite(grad_norm):
            optimizer.step()
        row = {"step": step + 1, "loss": all_sum(loss.detach()).item(), "lr": lr_now, "grad_norm": grad_norm,
               "tokens": int(tokens)}
        if on_step:
            on_step(step + 1, row, optimizer)
    model.zero_grad(set_to_none=True)  # no stale gradient in the memory, or in a later norm (LoRA's frozen base)


@torch.no_grad()
def evaluate(engine, examples, cfg):
    """Held-out metrics of the policy: greedy pass@1 `accuracy`, `format` compliance and mean
    completion `length` (tokens); with eval_k > 0 also `pass_at_k` (some of k samples at
    `temperature` is correct) and `sampled_accuracy` (the mean over those samples)."""
    correct, k, T = correctness(cfg.task), cfg.eval_k, cfg.max_new_tokens
    names = ["accuracy", "format", "length"] + (["pass_at_k", "sampled_accuracy"] if k else [])
    shard, counted = runs.padded_share(examples)  # the same number of batches on every rank; repeats do not count
    totals = torch.zeros(len(names))
    for start in range(0, len(shard), cfg.eval_batch_size):
        chunk = shard[start:start + cfg.eval_batch_size]
        ids, mask, _ = data.encode_prompts(engine.tokenizer, chunk, cfg, engine.model.device)
        out = engine.sample(ids, mask, T, temperature=0)
        texts = data.decode(engine.tokenizer, out, cfg.prefill)
        row = [[R.safe_reward(correct, t, e)[0], R.format_reward(t, e)] for t, e in zip(texts, chunk)]
        lengths = completion_mask(out, engine.eos_ids).sum(1, keepdim=True).cpu()
        row = torch.cat([torch.tensor(row), lengths], 1)
        if k:
            uniforms = my_share(torch.rand(runs.world_size() * len(chunk) * k, T)).to(ids.device)
            out = engine.sample(ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), T, cfg.temperature,
                                cfg.top_p, uniforms)
            texts = data.decode(engine.tokenizer, out, cfg.prefill)
            hits = torch.tensor([R.safe_reward(correct, t, chunk[i // k])[0] for i, t in enumerate(texts)]).view(-1, k)
            row = torch.cat([row, (hits.max(1).values > 0).float()[:, None], hits.mean(1, keepdim=True)], 1)
        totals += row[:max(0, counted - start)].sum(0)
    totals = all_sum(totals) / max(1, len(examples))
    return dict(zip(names, totals.tolist()))


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


def accumulate_gradients(engine, model, ids, attention, num_completion, advantages, loss_mask, old_logp, ref_logp, cfg,
                         sampler_logp=None):
    """Backpropagate the whole batch's GRPO loss one micro-batch at a time; the gradient equals
    the full-batch one because every micro-batch is normalised by the whole batch's denominator,
    summed over ranks under torchrun. old_logp None means mu = 1: the detached current log-probs
    stand in (ratio 1, same gradient). sampler_logp: the sampler's own log-probs of the tokens,
    for the sampler/trainer mismatch (logged) and, with tis_cap, its correction. Returns this
    rank's summed loss and masked-token statistics (tensors)."""
    denominator = all_sum(loss_denominator(loss_mask, cfg.loss_type, cfg.max_new_tokens)).clamp(min=1)
    loss_tokens = all_sum(loss_mask.sum()).clamp(min=1) if cfg.entropy_coef else None  # the bonus's mean
    sums = dict.fromkeys(STATS, 0.0)
    for i in range(0, len(ids), cfg.micro_batch_size):
        rows = slice(i, i + cfg.micro_batch_size)
        with runs.sync_gradients(model, last=i + cfg.micro_batch_size >= len(ids)):
            out = engine.logprobs(ids[rows], attention[rows], num_completion, cfg.temperature, model,
                                  with_entropy=cfg.entropy_coef > 0)
            logp, entropy = out if cfg.entropy_coef else (out, None)
            old = logp.detach() if old_logp is None else old_logp[rows]
            ref = None if ref_logp is None else ref_logp[rows]
            sampled = None if sampler_logp is None else sampler_logp[rows]
            weight = truncated_is_weight(old, sampled, cfg.tis_cap) if cfg.tis_cap and sampled is not None else None
            loss, stats = grpo_loss(logp, old, ref, advantages[rows], loss_mask[rows], cfg, denominator, weight,
                                    entropy, loss_tokens)
            runs.backward(loss)
        if sampled is not None:  # how far the sampler's log-probs are from the trainer's: |delta| and k3 KL
            delta = old - sampled  # k3 as expm1(d) - d: exact for the tiny d of the same model computed twice
            stats["mismatch_abs"] = (delta.abs() * loss_mask[rows]).sum()
            stats["mismatch_kl"] = ((torch.expm1(delta) - delta) * loss_mask[rows]).sum()
        stats.update(loss=loss.detach())
        for key, value in stats.items():
            sums[key] += value
    return sums


STATS = ("loss", "clip_low", "clip_high", "kl", "mismatch_abs", "mismatch_kl")  # summed over micro-batches


def policy_update(engine, model, optimizer, ids, attention, num_completion, advantages, loss_mask, old_logp, ref_logp,
                  cfg, sampler_logp=None):
    """mu = num_iterations AdamW steps on one batch, none when the loss sees no token on any rank.
    A step whose loss or gradient is not finite leaves weights and Adam as they were and ends the
    updates. -> (summed statistics, grad norm or None, updates made, skipped)."""
    sums, grad_norm = dict.fromkeys(STATS, 0.0), None
    model.train()
    if all_sum(loss_mask.sum()).item() == 0:
        return sums, grad_norm, 0, False
    for update in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        stats = accumulate_gradients(engine, model, ids, attention, num_completion, advantages, loss_mask, old_logp,
                                     ref_logp, cfg, sampler_logp)
        norm = runs.clip_grad_norm(model, cfg.grad_clip)
        if not (math.isfinite(norm) and math.isfinite(all_sum(stats["loss"]))):
            optimizer.zero_grad(set_to_none=True)
            return sums, grad_norm, update, True
        sums, grad_norm = {k: sums[k] + v for k, v in stats.items()}, norm
        optimizer.step()
    return sums, grad_norm, cfg.num_iterations, False


# ----------------------------------------------------------------------------
# setup shared by training and evaluation


def start(cfg):
    """Join torchrun's group, load the task, make the run directory, print the resolved config,
    seed the random streams -> (device, train set, test set)."""
    from transformers.utils import logging
    logging.disable_progress_bar()  # one progress bar is enough: ours
    device = runs.init_distributed(cfg)
    train_set, test_set = data.load_task(cfg.task, cfg.seed, cfg.data_path, cfg.eval_data_path, cfg.eval_size, cfg.digits)
    if not cfg.resume and not cfg.eval_only and os.path.exists(os.path.join(cfg.out_dir, "latest")):
        raise ConfigError(f"out_dir: {cfg.out_dir} already holds a run; continue it with --resume={cfg.out_dir}, "
                          "or start anew in another --out_dir")
    os.makedirs(cfg.out_dir, exist_ok=True)
    kind = "the tiny demo" if cfg.model == "tiny" else "a pretrained model"
    marks = {k: f"  # the default for {kind}" for k, pair in MODEL_DEFAULTS.items() if getattr(cfg, k) == pair[cfg.model != "tiny"]}
    say("config:\n" + "\n".join(f"  {k} = {v!r}{marks.get(k, '')}" for k, v in dataclasses.asdict(cfg).items()))
    say(f"data: {len(train_set)} training questions, {len(test_set)} held out")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls on tensor cores
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return device, train_set, test_set


def initial_model(cfg):
    """cfg.model's path; "tiny" is first built into the run directory."""
    path = os.path.join(cfg.out_dir, "tiny") if cfg.model == "tiny" else cfg.model
    if cfg.model == "tiny" and runs.main_rank():
        data.build_tiny_model(path, cfg.seed)
    barrier()
    return path


def load_policy(path, cfg, device, dtype, examples):
    """The policy and its engine, and cfg with the prompt limit fitted to the model's context.
    bf16 autocast by default on CUDA, and with dtype=bfloat16 on any device."""
    model, tokenizer = load_model(path, device, dtype, cfg.attn_implementation)
    if cfg.disable_dropout:
        disable_dropout(model)
    bf16 = (device.type == "cuda" or cfg.dtype == "bfloat16") if cfg.bf16 is None else cfg.bf16
    compile_decode = device.type == "cuda" if cfg.compile_decode is None else cfg.compile_decode
    engine = Engine(model, tokenizer, bf16, cfg.share_prompt, cfg.decoder, compile_decode)
    say(f"sampling: {'static KV cache' + (', compiled' if compile_decode else '') if engine.decoder else 'transformers'}"
        + ("" if engine.decoder else f" ({engine.why_not_static})"))
    return model, engine, data.resolve_prompt_limit(cfg, model, tokenizer, examples)


def cold_start(train_model, model, engine, train_set, cfg):
    """DeepSeek-R1's phase 1: SFT on the first sft_examples worked solutions at a constant sft_lr,
    saved as run_dir/cold_start, where RL (and its reference model) starts -> that path."""
    solved = [e for e in train_set[:cfg.sft_examples] if "solution" in e]
    if not solved:
        raise ConfigError(f"sft_steps: task {cfg.task} has no worked solutions for a cold start")
    show = runs.Progress("cold start")
    sft(train_model, engine, solved, cfg, cfg.sft_steps, cfg.sft_lr,
        on_step=lambda step, row, _: show(step, cfg.sft_steps, f"sft loss {row['loss']:.3f}"))
    path = os.path.join(cfg.out_dir, "cold_start")
    runs.save_model(path, model, engine.tokenizer)
    return path


def load_reference(path, state, cfg, device):
    """The frozen reference model in cfg.dtype: the policy's starting point, or a resumed run's
    synced copy."""
    ref_model = load_model(path, device, cfg.dtype, cfg.attn_implementation)[0].eval().requires_grad_(False)
    if state and "ref_model" in state:
        ref_model.load_state_dict(state["ref_model"])
    return runs.distribute(ref_model, cfg, device, trainable=False)


def evaluate_only(cfg):
    """Evaluate cfg.model (in cfg.dtype) on the held-out split; eval.json in out_dir."""
    device, train_set, test_set = start(cfg)
    path = initial_model(cfg)
    model, engine, cfg = load_policy(path, cfg, device, cfg.dtype, train_set + test_set)
    runs.distribute(model, cfg, device)  # FSDP shards the weights, as in training
    result = evaluate(engine, test_set, cfg)
    if runs.main_rank():
        runs.write_atomic(os.path.join(cfg.out_dir, "eval.json"),
                          json.dumps(dict(result, model=path, config=dataclasses.asdict(cfg)), indent=1))
    say(f"{path} on {len(test_set)} held-out questions: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    barrier()
    return result


# ----------------------------------------------------------------------------
# training


def train(cfg):
    wall_start = time.time()
    device, train_set, test_set = start(cfg)
    run_dir, G, state = cfg.out_dir, cfg.group_size, None
    reward_spec = R.parse_reward_spec(cfg.rewards)
    weights = torch.tensor([w for _, w in reward_spec])
    # the policy, trained in float32 whatever dtype says (AdamW's small steps would round away in
    # bf16): resumed from the latest checkpoint, or loaded (built for "tiny") and cold-started;
    # LoRA's frozen base loads in dtype and gets the adapters (fp32, peft's default)
    if cfg.resume:  # read only: the run directory changes once every check below has passed
        state, checkpoint, note = runs.open_resumed_run(run_dir)
        if note:
            say(note, file=sys.stderr)
    init_path = runs.init_model(run_dir, state) if state else initial_model(cfg)
    policy_path = checkpoint if state and not cfg.lora_rank else init_path  # LoRA: the base, then the adapter
    cold = not state and cfg.sft_steps > 0
    frozen = cfg.lora_rank and not cold  # a LoRA base that no cold start trains: in dtype
    saved_cfg = dataclasses.asdict(cfg)  # as given, before the prompt limit is fitted to the model
    model, engine, cfg = load_policy(policy_path, cfg, device, cfg.dtype if frozen else "float32", train_set + test_set)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # DDP's wrapper, or `model` itself sharded by FSDP; under LoRA only a cold start trains every weight
    train_model = runs.distribute(model, cfg, device) if cold or not cfg.lora_rank else model
    if cold:
        init_path = cold_start(train_model, model, engine, train_set, cfg)
    lora = None
    if cfg.lora_rank:  # adapters on the (cold-started) base, in place: the engine samples through them
        lora = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                        os.path.join(checkpoint, "adapter") if state else None)
        train_model = runs.distribute(model, cfg, device)  # DDP over the adapters' parameters
    ref_model = None  # beta = 0: none at all; LoRA: the base itself, adapters off
    if cfg.beta > 0:
        ref_model = WithoutAdapters(lora) if lora else load_reference(init_path, state, cfg, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.adam_betas,
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    train_model = torch.compile(train_model, dynamic=True) if cfg.compile else train_model
    if state:
        runs.restore_training(state, model, optimizer)
    runs.begin_run(run_dir, saved_cfg, (checkpoint, state["step"]) if state else None)  # every check has passed
    log = runs.RunLog(run_dir, cfg, fresh=not state)
    if state:
        start_step, before, (bad_steps, skipped_steps) = state["step"], state["eval_before"], state["bad_steps"]
    else:
        start_step, bad_steps, skipped_steps = 0, 0, 0
        before = evaluate(engine, test_set, cfg) if cfg.eval_size else {}
        if before:
            say(f"before RL: greedy accuracy {before['accuracy']:.1%} on {len(test_set)} held-out questions")
    show, rl_start, tokenizer = runs.Progress("grpo"), time.time(), engine.tokenizer

    with runs.stop_signals() as signals:
        for step in range(start_step, cfg.max_steps):
            # 1. sample G completions for each of this rank's questions
            t0 = runs.clock(device)
            examples = my_share(data.step_examples(train_set, step, cfg.prompts_per_step, cfg.seed))
            uniforms = my_share(torch.rand(cfg.prompts_per_step * G, cfg.max_new_tokens)).to(device)  # one stream, all ranks
            prompt_ids, prompt_mask, prompts_cut = data.encode_prompts(tokenizer, examples, cfg, device)
            prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
            completion_ids, sampler_logp, entropies = engine.sample(prompt_ids, prompt_mask, cfg.max_new_tokens,
                                                                    cfg.temperature, cfg.top_p, uniforms, return_stats=True)
            mask = completion_mask(completion_ids, engine.eos_ids)
            truncated = ~torch.isin(completion_ids, engine.eos_ids).any(1)
            texts = data.decode(tokenizer, completion_ids, cfg.prefill)
            t1 = runs.clock(device)

            # 2. rewards, group-relative advantages, and which completions the loss sees
            scores, failures, correct = score(texts, examples, mask.sum(1), reward_spec, cfg)
            scores, correct = gather(scores), gather(correct)  # every rank sees the whole step from here on
            t2 = runs.clock(device)
            rewards = scores @ weights
            advantages = my_share(group_advantages(rewards, G, cfg.scale_rewards, cfg.adv_eps, cfg.advantage)).to(device)
            zero_std = (rewards.view(-1, G) == rewards.view(-1, G)[:, :1]).all(1)
            loss_mask = dapo_filters(mask, my_share(zero_std).to(device), truncated, cfg.drop_zero_std_groups,
                                     cfg.mask_truncated)

            # 3. old and reference log-probs: one no-grad pass each, only when needed
            ids = torch.cat([prompt_ids, completion_ids], 1)
            attention = torch.cat([prompt_mask, torch.ones_like(completion_ids)], 1)
            C, M = completion_ids.size(1), cfg.micro_batch_size
            old_logp = engine.logprobs(ids, attention, C, cfg.temperature, train_model, M) if cfg.num_iterations > 1 else None
            ref_logp = engine.logprobs(ids, attention, C, cfg.temperature, ref_model, M) if ref_model is not None else None
            t3 = runs.clock(device)

            # 4. mu policy updates on this batch at the step's learning rate, then the reference model
            lr = set_lr(optimizer, cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
            update = policy_update(engine, train_model, optimizer, ids, attention, C, advantages, loss_mask, old_logp,
                                   ref_logp, cfg, sampler_logp)
            bad_steps, skipped_steps = (bad_steps + 1 if update[3] else 0), skipped_steps + update[3]
            synced = ref_model is not None and cfg.ref_sync_every > 0 and (step + 1) % cfg.ref_sync_every == 0
            if synced:
                sync_reference(ref_model, model, cfg.ref_sync_alpha)
            t4 = runs.clock(device)

            # 5. log, evaluate, checkpoint
            counts = {"loss_tokens": loss_mask.sum(), "tokens": mask.sum(), "entropy": (entropies * mask).sum(),
                      "reward_errors": failures, "prompts_cut": prompts_cut, "reflecting": sum(map(R.reflects, texts))}
            row = runs.step_metrics(step + 1, rewards, scores, reward_spec, correct, zero_std, mask.sum(1), truncated,
                                    counts, update, ref_model is not None, (t0, t1, t2, t3, t4))
            row.update(lr=lr, ref_synced=synced, skipped_total=skipped_steps)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                row.update({f"eval_{k}": v for k, v in evaluate(engine, test_set, cfg).items()})
            log.write(row)
            show(step + 1, cfg.max_steps, f"reward {row['reward_mean']:.2f} acc {row['accuracy']:.2f} "
                                          f"len {row['completion_len_mean']:.1f}")
            if cfg.log_samples_every and (step + 1) % cfg.log_samples_every == 0:
                for g in range(min(2, len(examples))):
                    say(f"  [step {step + 1}] {examples[g]['question'][:200]!r} -> {texts[g * G][:300]!r} "
                        f"(reward {rewards[g * G]:.2f}, answer {examples[g]['answer']})", file=sys.stderr)
                samples = runs.sample_rows(step + 1, examples, texts, my_share(scores), reward_spec, my_share(rewards),
                                           advantages, mask.sum(1), truncated, G)
                log.samples(samples)
            signalled = runs.any_rank(signals)  # a signal to any rank stops them all
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or signalled or bad_steps >= cfg.max_bad_steps:
                runs.save_training(run_dir, step + 1, model, tokenizer, optimizer, cfg.keep_checkpoints,
                                   ref_model if cfg.ref_sync_every > 0 else None, lora,
                                   lora and (lambda: merged_weights(lora)), **runs.init_model_fields(run_dir, init_path),
                                   eval_before=before, bad_steps=(bad_steps, skipped_steps), config=saved_cfg)
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
    after = evaluate(engine, test_set, cfg) if cfg.eval_size else {}
    summary = {"accuracy_before": before.get("accuracy"), "accuracy_after": after.get("accuracy"),
               "format_before": before.get("format"), "format_after": after.get("format"),
               "length_before": before.get("length"), "length_after": after.get("length"),
               "eval_questions": len(test_set) if cfg.eval_size else 0, "steps": cfg.max_steps,
               "ranks": runs.world_size(), "rl_seconds": rl_seconds, "wall_seconds": time.time() - wall_start,
               "run_dir": os.path.abspath(run_dir)}
    if runs.main_rank():
        runs.write_atomic(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=1))
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
    def run():
        cfg = parse_config(argv)
        if cfg.eval_only:
            return evaluate_only(cfg)
        with runs.interrupts_say_how_to_go_on(cfg.out_dir):
            train(cfg)
    return runs.cli("grpo.py", run)


if __name__ == "__main__":
    runs.exit(main(sys.argv[1:]))
