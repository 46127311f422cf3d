import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data", "gsm8k")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    import data
    return data.build_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    import engine
    model, tokenizer = engine.load_model(tiny_dir, "cpu")
    return model.eval(), tokenizer


def loss_of(logp, old, ref, advantages, mask, denominator, bonus=None, **objective):
    """grpo.grpo_loss on these tensors with an Objective of `objective`'s numbers, and with bonus =
    (entropy, loss tokens) the entropy bonus, as grpo.accumulate_gradients adds it -> (loss, stats)."""
    import grpo
    import objectives
    objective.setdefault("clip_eps_high", objective.get("clip_eps_low", 0.2))  # as parse_config resolves it
    o = grpo.Objective(**objective)
    batch = grpo.Rollout(None, None, advantages, mask, old, ref, torch.zeros_like(old))
    loss, stats = grpo.grpo_loss(logp, batch, denominator, o)
    if bonus is not None:
        loss = loss - objectives.entropy_bonus(bonus[0], mask, o.entropy_coef, bonus[1])
    return loss, stats


def draw(model, ids, mask, *how, **named):
    """engine.sample's tokens, with the settings engine.Sampling(*how, **named)."""
    import engine
    return engine.sample(model, ids, mask, engine.Sampling(*how, **named)).tokens
