"""
objectives.py: the variants of GRPO's objective that papers since DeepSeekMath proposed, as pure
functions on tensors, with their options. grpo.py holds the paper's own objective (group
advantages, the clipped surrogate, the k3 KL, the grpo / dapo / dr_grpo aggregation, the loss
mask with DAPO's filters) and its tables of estimators and surrogates; each variant here is an
entry of a table there or plugs in at one visible line, and every option's default leaves it off.
"""
from dataclasses import dataclass
from typing import Literal

import torch

from configurator import unread



@dataclass
class Variants:
    # objective variants (objectives.py), each off by default
    importance_sampling_level: Literal["token", "sequence"] = "token"  # ratio per token | sequence (GSPO)
    delta: float = 0.0             # cap of the unclipped ratio, binding for A < 0; 0 = off (INTELLECT-2: 4)
    cispo_cap: float = 5.0         # surrogate=cispo: cap of the detached importance weight (ScaleRL: 5)
    entropy_coef: float = 0.0      # entropy bonus: minus coef x mean token entropy; 0 = off (PPO's bonus)
    tis_cap: float = 0.0           # truncated IS: tokens weighed by min(pi_old / pi_sampler, cap); 0 = off

    def checks(self):
        return [(self.delta >= 0, "delta: must not be negative"),
                (not self.delta or self.delta > 1 + self.clip_eps_high,
                 f"delta: {self.delta} must exceed 1 + clip_eps_high ({1 + self.clip_eps_high:g}), or be 0"),
                (not self.delta or self.surrogate != "cispo",
                 "delta: caps the clipped objective's ratio; surrogate=cispo has none"),
                (self.cispo_cap > 0, "cispo_cap: must be positive"),
                (self.entropy_coef >= 0, "entropy_coef: must not be negative"),
                (self.tis_cap >= 0, "tis_cap: must not be negative"),
                *unread(self, self.surrogate != "cispo", ("cispo_cap",),
                        f"surrogate={self.surrogate} is not cispo"),
                *unread(self, self.surrogate == "cispo", ("clip_eps_low", "clip_eps_high"),
                        "surrogate=cispo clips no ratio (it caps its weight at cispo_cap)")]


def rloo_baseline(r):
    """RLOO's baseline (arXiv 2402.14740) for rewards r [N/G, G]: the mean of the group's other
    G - 1 rewards, so that A_i = r_i - b_i is G / (G - 1) times the group-mean advantage."""
    return (r.sum(1, keepdim=True) - r) / (r.size(1) - 1)


def reinforce_pp_advantages(rewards, group_size, scale=None, eps=1e-4):
    """REINFORCE++ with baseline (arXiv 2501.03262): B_i = r_i - mean_group(r), then whitened over
    the whole batch, A_i = (B_i - mean(B)) / (std(B) + eps); rewards [N] -> [N]; a group whose
    rewards are all equal gets exactly 0. scale: unread (the whitening is its own), for the
    signature grpo.ADVANTAGES shares."""
    r = rewards.view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    whitened = (centred - centred.mean()) / (centred.std() + eps)
    all_equal = (r == r[:, :1]).all(1, keepdim=True)
    return torch.where(all_equal, 0.0, whitened).view(-1)


def sequence_log_ratio(log_ratio, mask):
    """GSPO's ratio (arXiv 2507.18071): log s_i = (1/|o_i|) sum_t log rho_it over the completion's
    tokens in mask, the log of the geometric mean of its token ratios, the same for each of its
    tokens; [B, T] -> [B, T]."""
    mean = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    return mean.expand_as(log_ratio)


def cispo_surrogate(logp, log_ratio, advantages, cap):
    """CISPO's per-token loss -sg(min(rho, cap)) * A * logp (MiniMax-M1, arXiv 2506.13585): the
    importance weight is clipped and detached, not the update, so every token keeps a gradient.
    logp, log_ratio [B, T], advantages [B] -> (loss, no low clip, capped: rho > cap), [B, T] each."""
    ratio = torch.exp(log_ratio)
    loss = -ratio.clamp(max=cap).detach() * advantages[:, None] * logp
    return loss, torch.zeros_like(ratio, dtype=torch.bool), ratio > cap


def delta_capped(ratio, delta):
    """INTELLECT-2's two-sided clip (arXiv 2505.07291): the unclipped term's ratio capped at delta,
    min(rho, delta), which binds only where A < 0 (the clip binds first where A > 0)."""
    return ratio.clamp(max=delta)


def truncated_is_weight(old_logp, sampler_logp, cap):
    """Truncated importance sampling for tokens drawn by a sampler that differs slightly from the
    trained policy (another kernel, precision or batch shape): w = min(pi_old / pi_sampler, cap)
    per token, [B, T] -> [B, T], detached; it multiplies the policy term (as TRL's
    vllm_importance_sampling_correction does)."""
    return torch.exp(old_logp - sampler_logp).clamp(max=cap).detach()


def entropy_bonus(entropy, mask, coef, tokens):
    """What the entropy bonus takes off the loss: coef x the mean entropy [B, T] over the whole
    batch's `tokens` loss tokens (mask [B, T]: this micro-batch's), the same whatever the loss type
    (as TRL; PPO, arXiv 1707.06347, eq. 9)."""
    return coef * (entropy * mask).sum() / tokens
