"""
sft.py: supervised fine-tuning of the policy on worked completions, with loss on completion tokens
only: DeepSeek-R1's cold start before RL (grpo.py runs it for the demo), and r1.py's SFT and
distillation phases.
"""
import math
import os
import random
from dataclasses import dataclass
from typing import Optional

import torch

import data
import distributed
import runs
import tools
from configurator import ConfigError, unread
from engine import completion_mask


@dataclass
class ColdStart:
    # cold start (DeepSeek-R1 phase 1; sft.py)
    sft_steps: Optional[int] = None  # SFT steps before RL; None = 150 for model="tiny", else 0 (R1-Zero: 0)
    sft_examples: int = 500        # distinct worked examples the cold start sees (R1: thousands)
    sft_batch_size: int = 32       # examples per SFT step
    sft_lr: Optional[float] = None  # SFT learning rate (constant); None = 1e-3 for model="tiny", else 1e-5

    def checks(self):
        ranks = distributed.world_size_asked()  # before the process group is joined
        return [(self.sft_steps >= 0, "sft_steps: must not be negative"),
                (self.sft_examples >= 0, "sft_examples: must not be negative"),
                (self.sft_batch_size >= 1, "sft_batch_size: must be at least 1"),
                (self.sft_lr >= 0, "sft_lr: must not be negative"),
                (self.sft_steps == 0 or self.sft_batch_size % ranks == 0,
                 f"sft_batch_size: {self.sft_batch_size} does not divide among {ranks} ranks"),
                *unread(self, self.sft_steps == 0, ("sft_examples", "sft_batch_size", "sft_lr"),
                        "no cold start runs (sft_steps=0)")]


def sft_loss(engine, batch, cfg, model=None):
    """-log pi(solution | prompt) per token: the mean over the completion tokens (EOS included) of
    every rank's batch; prompt tokens carry no loss. batch: examples with "question" and
    "solution". Returns (loss, number of completion tokens on all ranks)."""
    device = engine.model.device
    prompt_ids, prompt_mask, _ = data.encode_prompts(engine.tokenizer, batch, cfg, device)
    solutions = [e["solution"] for e in batch]
    completion_ids = data.encode_completions(engine.tokenizer, solutions, device)
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, torch.ones_like(completion_ids)], 1)
    # a result in a worked solution is the tool's text, as in a sampled transcript: no loss on it
    mask = completion_mask(completion_ids, engine.eos_ids) * tools.written_mask(
        engine.tokenizer, solutions, cfg.tool_tags, completion_ids.shape).to(device)
    # every row its own prompt pass, as the update's (share_prompt is for groups)
    logp = engine.logprobs(ids, attention, completion_ids.size(1), model, share_prompt=False)
    tokens = distributed.all_sum(mask.sum())
    return -(logp * mask).sum() / tokens, tokens


def sft(model, engine, examples, cfg, steps, lr_at, on_step=None):
    """Supervised fine-tuning of `model` (the policy or its DDP wrapper): `steps` batches of
    sft_batch_size examples drawn at random (seeded), AdamW at lr_at(step). A step with a
    non-finite gradient leaves the weights as they were. Under torchrun each rank takes its share
    of every batch. on_step(step, metrics row, optimizer) runs after each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr_at(0), weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    model.train()
    for step in range(steps):
        batch = rng.sample(examples, min(cfg.sft_batch_size, len(examples)))
        loss, tokens = sft_loss(engine, distributed.strided_share(batch), cfg, model)
        optimizer.zero_grad(set_to_none=True)
        distributed.backward(loss)
        grad_norm = distributed.clip_grad_norm(model, cfg.grad_clip)
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if math.isfinite(grad_norm):
            optimizer.step()
        row = {"step": step + 1, "loss": distributed.all_sum(loss.detach()).item(), "lr": lr,
               "grad_norm": grad_norm, "tokens": int(tokens)}
        if on_step:
            on_step(step + 1, row, optimizer)
    model.zero_grad(set_to_none=True)  # no stale gradient in memory, or in a later norm (LoRA's frozen base)


def cold_start(train_model, model, engine, train_set, cfg):
    """DeepSeek-R1's phase 1: SFT on the first sft_examples worked solutions at a constant sft_lr,
    saved as run_dir/cold_start, where RL (and its reference model) starts -> that path."""
    solved = [e for e in train_set[:cfg.sft_examples] if "solution" in e]
    if not solved:
        raise ConfigError(f"sft_steps: task {cfg.task} has no worked solutions for a cold start")
    show = runs.Progress("cold start")
    sft(train_model, engine, solved, cfg, cfg.sft_steps, lambda step: cfg.sft_lr,
        on_step=lambda step, row, _: show(step, cfg.sft_steps, f"sft loss {row['loss']:.3f}"))
    path = os.path.join(cfg.out_dir, "cold_start")
    runs.save_model(path, model, engine.tokenizer)
    return path
