import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data", "gsm8k")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a whole run, a subprocess, a compile or several seconds of "
                                       "work; the fast tier is `python -m pytest -q tests -m \"not slow\"`")


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
    o = grpo.Config(**objective)
    batch = grpo.Rollout(None, None, advantages, mask, old, ref, torch.zeros_like(old))
    loss, stats = grpo.grpo_loss(logp, batch, denominator, o)
    if bonus is not None:
        loss = loss - objectives.entropy_bonus(bonus[0], mask, o.entropy_coef, bonus[1])
    return loss, stats


def draw(model, ids, mask, *how, **named):
    """grpo.sample's tokens, with the settings engine.Sampling(*how, **named) (uniforms drawn)."""
    import engine
    import grpo
    return grpo.sample(model, ids, mask, drawn(ids, engine.Sampling(*how, **named))).tokens


def drawn(ids, how):
    """`how` (engine.Sampling) with its uniforms drawn for prompts ids [B, P], if it has none."""
    import engine
    return how if how.uniforms is not None else how._replace(uniforms=engine.draw_uniforms(ids, how))


def left_padded(tokenizer, texts):
    """Prompt ids [B, W] and mask [B, W] of `texts`, each row left-padded to the longest."""
    rows = [tokenizer(text)["input_ids"] for text in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])


def load_bench(name):
    """bench/NAME.py as a module (bench/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.fixture(scope="session")
def caller_dir(tmp_path_factory):
    """The tiny model taught by SFT (200 steps, ~30 s on 2 cores) to answer `a*b+c` with two
    calculator calls: <think><tool>a*b</tool><result>P</result><tool>P+c</tool><result>Q</result>
    </think><answer>Q</answer> (its results out of the loss, as the cold start leaves them)."""
    import random

    import data
    import engine
    import grpo
    import runs
    import sft
    path = data.build_tiny_model(str(tmp_path_factory.mktemp("caller")), seed=0)
    cfg = grpo.parse_config([f"--model={path}", "--max_prompt_tokens=64"])
    model, policy = engine.open_policy(path, cfg, torch.device("cpu"), "float32", grpo.DEFINITION)
    rng, examples = random.Random(0), []
    for _ in range(4000):
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(1, 9)
        p, q = a * b, a * b + c
        calls = f"<tool>{a}*{b}</tool><result>{p}</result><tool>{p}+{c}</tool><result>{q}</result>"
        solution = f"<think>{calls}</think><answer>{q}</answer>"  # ~84 tokens
        examples.append({"question": f"{a}*{b}+{c}", "solution": solution})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sft.sft(model, policy, examples, cfg, 200, lambda step: 1e-3)
    runs.save_model(path, model, policy.tokenizer)
    return path


class Loaded(Exception):
    """Raised where a run would load its model: it got that far."""


def stop_at(monkeypatch, module, name):
    """Make module.name (a function that loads a model) raise Loaded instead."""
    def load(*args, **kwargs):
        raise Loaded
    monkeypatch.setattr(module, name, load)


@pytest.fixture(autouse=True)
def release_run_directories():
    """A test that trains in-process lets go of its run directories (as the command does on exit)."""
    yield
    import runs
    runs.release_run_dir()
