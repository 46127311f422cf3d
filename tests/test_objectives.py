"""The newer objectives (GSPO, CISPO, RLOO, REINFORCE++, INTELLECT-2's delta, the entropy bonus):
each against values worked by hand, and against TRL's own GRPOTrainer._compute_loss where TRL
implements the same option (skipped when trl is not installed)."""
import collections
import math
import types

import pytest
import torch

import engine
import grpo
import objectives
from conftest import loss_of


# ---- advantages

def test_rloo_leave_one_out_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = grpo.group_advantages(r, 4, "none", baseline=objectives.rloo_baseline)
    # r=1: 1 - mean(0, 0, 1) = 2/3; r=0: 0 - mean(1, 0, 1) = -2/3; the all-equal group: exactly 0
    assert torch.allclose(a, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]))
    assert torch.equal(a[4:], torch.zeros(4))
    # leave-one-out is G / (G - 1) times the group-mean baseline
    assert torch.allclose(a, grpo.group_advantages(r, 4, "none") * 4 / 3)
    # with the group's std (unbiased: sqrt(1/3)), as scale_rewards=group says
    rloo = grpo.group_advantages(r, 4, "group", eps=0.0, baseline=objectives.rloo_baseline)
    assert rloo[0].item() == pytest.approx((2 / 3) / math.sqrt(1 / 3))


def test_reinforce_pp_whitens_over_the_batch_by_hand():
    r = torch.tensor([1.0, 0.0, 3.0, 3.0, 0.0, 2.0])
    # group-centred: 0.5, -0.5, 0, 0, -1, 1; batch mean 0, unbiased std sqrt(2.5 / 5)
    expected = torch.tensor([0.5, -0.5, 0.0, 0.0, -1.0, 1.0]) / math.sqrt(0.5)
    a = objectives.reinforce_pp_advantages(r, 2, eps=0.0)  # its own normalisation: no scale_rewards
    assert torch.allclose(a, expected, atol=1e-6)
    assert torch.equal(a[2:4], torch.zeros(2))  # the all-equal group: exactly 0
    assert torch.equal(objectives.reinforce_pp_advantages(torch.ones(6), 2, eps=1e-4), torch.zeros(6))
    assert grpo.ADVANTAGES["reinforce_pp"] is objectives.reinforce_pp_advantages


# ---- GSPO: the sequence-level ratio

def test_sequence_log_ratio_is_the_mean_over_the_completion():
    logp = torch.tensor([[0.1, 0.3, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    log_ratio = objectives.sequence_log_ratio(logp - torch.zeros(1, 3), mask)
    assert torch.allclose(log_ratio, torch.full((1, 3), 0.2))
    log_ratio[0, 0].backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.5, 0.5, 0.0]]))  # 1/|o| per completion token


def test_gspo_loss_by_hand():
    """Row 0: log-ratios 0.1, 0.3 -> s = e^0.2 = 1.2214 with A = +1: clipped at 1.2, no gradient.
    Row 1: -0.3, -0.3, 0 -> s = e^-0.2 = 0.8187 with A = -1: inside [0.8, 1.2], loss s per token.
    grpo aggregation: (-1.2 + 0.8187) / 2; d/d logp_t of row 1 = s / 3 / 2."""
    logp = torch.tensor([[0.1, 0.3, 0.0], [-0.3, -0.3, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, stats = loss_of(logp, torch.zeros(2, 3), None, torch.tensor([1.0, -1.0]), mask, 2,
                          importance_sampling_level="sequence", beta=0.0)
    s = math.exp(-0.2)
    assert loss.item() == pytest.approx((-1.2 + s) / 2, rel=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [s / 6, s / 6, s / 6]]), atol=1e-7)
    assert stats["clip_high"].item() == 2 and stats["clip_low"].item() == 0  # row 0's two tokens


# ---- CISPO and delta

def test_cispo_caps_the_weight_and_keeps_every_gradient():
    """ratios 10 and 1, A = 2, cap 5: weights 5 and 1 (detached); loss -w A logp per token, token
    mean: (-5*2*log 0.5 - 1*2*log 0.25) / 2; gradient -w A / 2 = -5, -1. PPO's clip would give
    the first token no gradient at all."""
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], requires_grad=True)
    old = torch.tensor([[math.log(0.05), math.log(0.25)]])
    mask = torch.ones(1, 2)
    assert grpo.loss_denominator(mask, "dapo", 8).item() == 2
    loss, stats = loss_of(logp, old, None, torch.tensor([2.0]), mask, 2, surrogate="cispo", loss_type="dapo",
                          beta=0.0, cispo_cap=5.0)
    assert loss.item() == pytest.approx((-10 * math.log(0.5) - 2 * math.log(0.25)) / 2, rel=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-5.0, -1.0]]))
    assert stats["clip_high"].item() == 1
    ppo = logp.detach().requires_grad_()
    loss_of(ppo, old, None, torch.tensor([2.0]), mask, 2, loss_type="dapo", beta=0.0)[0].backward()
    assert ppo.grad[0, 0].item() == 0.0


@pytest.mark.parametrize("adv, delta, loss, grad", [
    (-1.0, 0.0, 6.0, 6.0),    # ratio 6, A < 0: unclipped, gradient rho * -A = 6
    (-1.0, 4.0, 4.0, 0.0),    # delta caps it at 4: loss 4, no gradient
    (1.0, 4.0, -1.2, 0.0),    # A > 0: the ordinary clip at 1.2 binds first, delta changes nothing
    (-1.0, 8.0, 6.0, 6.0),    # delta above the ratio: unchanged
])
def test_delta_two_sided_clip_by_hand(adv, delta, loss, grad):
    logp = torch.tensor([[math.log(6.0)]], requires_grad=True)
    out, _, _ = grpo.clipped_surrogate(logp, torch.tensor([adv]), 0.2, 0.2, delta)
    out.sum().backward()
    assert out.item() == pytest.approx(loss, rel=1e-6)
    assert logp.grad.item() == pytest.approx(grad, rel=1e-6, abs=1e-7)


# ---- the entropy bonus

def test_entropy_bonus_is_coef_times_the_token_mean():
    logp = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    entropy = torch.tensor([[1.0, 2.0], [3.0, 9.0]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    plain, _ = loss_of(logp, logp, None, adv, mask, 2, beta=0.0, entropy_coef=0.1)
    bonus, _ = loss_of(logp, logp, None, adv, mask, 2, (entropy, 3), beta=0.0, entropy_coef=0.1)
    assert (bonus - plain).item() == pytest.approx(-0.1 * 6 / 3)   # the masked 9.0 does not count
    bonus.backward()
    assert torch.allclose(entropy.grad, torch.tensor([[-0.1 / 3, -0.1 / 3], [-0.1 / 3, 0.0]]))


def test_engine_entropy_has_gradients_and_the_right_value(tiny):
    model, _ = tiny
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    logp, entropy = grpo.completion_logprobs(model, ids, torch.ones_like(ids), 3, temperature=0.7)
    logits = model(input_ids=ids).logits[:, -4:-1].float() / 0.7
    p = torch.softmax(logits, -1)
    assert torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-5)
    assert entropy.requires_grad
    entropy.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


# ---- the config

@pytest.mark.parametrize("args, message", [
    (["--delta=1.1"], "delta: 1.1 must exceed 1 + clip_eps_high (1.2)"),
    (["--delta=4", "--loss_type=cispo"], "delta: caps the clipped objective's ratio"),
    (["--entropy_coef=-0.1"], "entropy_coef: must not be negative"),
    (["--advantage=vtrace"], "advantage: 'vtrace' is not one of grpo, rloo, reinforce_pp"),
    (["--importance_sampling_level=group"],
     "importance_sampling_level: 'group' is not one of token, sequence"),
])
def test_bad_objective_flags_are_refused(args, message):
    with pytest.raises(grpo.ConfigError,
                       match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        grpo.parse_config(args)


# ---- against TRL's GRPOTrainer._compute_loss


def trl_loss(logp, entropy, old, ref, adv, mask, options):
    """TRL's loss for these tensors: its _compute_loss on a stand-in trainer whose forward returns
    them, with `options` (loss_type, level, eps_low, eps_high, delta, beta, entropy_coef)."""
    o = {"level": "token", "eps_low": 0.2, "eps_high": 0.2, "delta": None, "beta": 0.0, "entropy_coef": 0.0,
         **options}
    loss_type, level, eps_low, eps_high, beta, entropy_coef = (
        o[k] for k in ("loss_type", "level", "eps_low", "eps_high", "beta", "entropy_coef"))
    delta, max_completion_length = o["delta"], 8
    trainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer
    metrics = collections.defaultdict(lambda: collections.defaultdict(list))
    same = lambda x, **_: x  # noqa: E731 (one process)
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropy, None), aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        accelerator=types.SimpleNamespace(num_processes=1, gather=same, reduce=same, gather_for_metrics=same,
                                          sync_gradients=True),
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1),
        _entropy_bonus_enabled=entropy_coef > 0, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        _metrics=metrics)
    inputs = {"prompt_ids": torch.zeros(len(logp), 1, dtype=torch.long),
              "prompt_mask": torch.ones(len(logp), 1),
              "completion_ids": torch.zeros_like(mask, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return trainer._compute_loss(fake, None, inputs)


CASES = {  # our flags -> TRL's arguments for the same objective
    "grpo": ({}, {"loss_type": "grpo"}),
    "dapo clip-higher": ({"loss_type": "dapo", "clip_eps_high": 0.28},
                         {"loss_type": "dapo", "eps_high": 0.28}),
    "dr_grpo": ({"loss_type": "dr_grpo"}, {"loss_type": "dr_grpo"}),
    "gspo": ({"importance_sampling_level": "sequence", "clip_eps_low": 3e-4, "clip_eps_high": 4e-4},
             {"loss_type": "grpo", "level": "sequence", "eps_low": 3e-4, "eps_high": 4e-4}),
    "cispo": ({"surrogate": "cispo", "loss_type": "dapo", "cispo_cap": 5.0},
              {"loss_type": "cispo", "eps_high": 5.0}),
    "cispo sequence": ({"surrogate": "cispo", "loss_type": "dapo", "cispo_cap": 1.1,
                        "importance_sampling_level": "sequence"},
                       {"loss_type": "cispo", "eps_high": 1.1, "level": "sequence"}),
    "delta": ({"delta": 1.5}, {"loss_type": "grpo", "delta": 1.5}),
    "entropy bonus dapo": ({"loss_type": "dapo", "entropy_coef": 0.05},
                           {"loss_type": "dapo", "entropy_coef": 0.05}),
    "beta": ({"beta": 0.04}, {"loss_type": "grpo"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_same_loss_and_gradient_as_trl(case):
    ours, theirs = CASES[case]
    torch.manual_seed(0)
    B, T = 6, 8
    mask = torch.ones(B, T)
    for row, length in enumerate([8, 3, 5, 1, 8, 6]):
        mask[row, length:] = 0
    base = torch.randn(B, T) - 2
    old, ref = base + 0.5 * torch.randn(B, T), base + 0.3 * torch.randn(B, T)
    adv = torch.tensor([1.2, -0.7, 0.3, -1.5, 0.9, -0.2])
    entropy_value = torch.rand(B, T) * 3
    results = []
    for use_trl in (True, False):
        logp = base.clone().requires_grad_()
        entropy = entropy_value.clone().requires_grad_()
        if use_trl:
            loss = trl_loss(logp, entropy, old, ref, adv, mask, dict(theirs, beta=ours.get("beta", 0.0)))
        else:
            o = {"beta": 0.0, **ours}
            denominator = grpo.loss_denominator(mask, o.get("loss_type", "grpo"), T)
            bonus = (entropy, mask.sum()) if o.get("entropy_coef") else None
            loss, _ = loss_of(logp, old, ref if o["beta"] else None, adv, mask, denominator, bonus, **o)
        loss.backward()
        results.append((loss.item(), logp.grad, entropy.grad))
    (trl_value, trl_grad, trl_entropy_grad), (value, grad, entropy_grad) = results
    assert value == pytest.approx(trl_value, rel=1e-5, abs=1e-7)
    assert torch.allclose(grad, trl_grad, rtol=1e-5, atol=1e-7)
    if ours.get("entropy_coef"):
        assert torch.allclose(entropy_grad, trl_entropy_grad, rtol=1e-5, atol=1e-8)


# ---- end to end

@pytest.mark.parametrize("flags", [
    ["--importance_sampling_level=sequence", "--clip_eps_low=3e-4", "--clip_eps_high=4e-4",
     "--advantage=rloo", "--scale_rewards=none"],
    ["--loss_type=cispo", "--advantage=reinforce_pp", "--entropy_coef=0.01"],
    ["--delta=4", "--entropy_coef=0.01", "--loss_type=dapo"],
])
@pytest.mark.slow
def test_the_newer_objectives_train(tmp_path, flags):
    from test_train import FAST, metrics
    grpo.train(grpo.parse_config(FAST + ["--max_steps=2", "--num_iterations=2", "--lr=1e-3", *flags,
                                         f"--out_dir={tmp_path}"]))
    rows = metrics(tmp_path)
    assert all(r["updates"] == 2 and r["grad_norm"] > 0 and math.isfinite(r["loss"]) for r in rows)


def test_loss_type_cispo_is_the_old_name_of_the_cispo_surrogate():
    """It still parses, as surrogate=cispo with CISPO's token mean (loss_type=dapo); given beside an
    explicit other surrogate it contradicts, it is refused in one line."""
    cfg = grpo.parse_config(["--loss_type=cispo"])
    assert (cfg.surrogate, cfg.loss_type) == ("cispo", "dapo")
    assert grpo.Config(loss_type="cispo").surrogate == "cispo"
    assert grpo.Config(surrogate="cispo").loss_type == "grpo"  # the new name leaves the aggregation alone
    with pytest.raises(grpo.ConfigError, match="loss_type: cispo, the old name .* surrogate=clip"):
        grpo.parse_config(["--loss_type=cispo", "--surrogate=clip"])
    with pytest.raises(grpo.ConfigError, match="cispo_cap: .* surrogate=clip is not cispo"):
        grpo.parse_config(["--cispo_cap=3"])
    assert grpo.SURROGATES["cispo"] is not None and set(grpo.SURROGATES) == {"clip", "cispo"}


@pytest.mark.parametrize("name", sorted(grpo.ADVANTAGES))
def test_every_estimator_gives_all_zero_exactly_to_the_groups_without_a_signal(name):
    """train() reads the groups whose rewards are all equal off the advantages (all exactly 0), for
    zero_std_frac and drop_zero_std_groups: every entry of ADVANTAGES keeps that contract, both ways."""
    torch.manual_seed(0)
    rewards = torch.randint(0, 3, (40, 4)).float() / 2
    rewards[::3] = rewards[::3, :1]  # every third group all equal
    equal = (rewards == rewards[:, :1]).all(1)
    for scale in ("group", "batch", "none"):
        advantages = grpo.ADVANTAGES[name](rewards.view(-1), 4, scale, 1e-4).view(-1, 4)
        assert torch.equal((advantages == 0).all(1), equal), scale
