"""The GRPO math against values computed by hand."""
import math

import pytest
import torch

import data
import engine
import grpo
import objectives
import runs
from conftest import loss_of


def test_advantages_group_scaling():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) -> +-0.5 / 0.57735 = +-0.866025
    a = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, "group", eps=0.0)
    assert torch.allclose(a, torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-6)
    # with eps the std is (0.57735 + 0.1)
    a = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, "group", eps=0.1)
    assert a[0].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + 0.1), rel=1e-6)


def test_advantages_two_groups_one_all_equal():
    # groups [1, 3] and [5, 5]: first has mean 2 and std sqrt(2); the second is all equal -> 0
    a = grpo.group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2, "group", eps=1e-4)
    expected = 1 / (math.sqrt(2) + 1e-4)
    assert torch.allclose(a, torch.tensor([-expected, expected, 0.0, 0.0]))
    assert a[2].item() == 0.0 and a[3].item() == 0.0


def test_advantages_batch_and_none_scaling():
    r = torch.tensor([1.0, 3.0, 5.0, 5.0])
    # centred per group: [-1, 1, 0, 0]; batch std of [1, 3, 5, 5] = sqrt(11 / 3) = 1.914854
    assert torch.allclose(grpo.group_advantages(r, 2, "batch", eps=0.0),
                          torch.tensor([-0.522233, 0.522233, 0.0, 0.0]), atol=1e-6)
    assert torch.equal(grpo.group_advantages(r, 2, "none"), torch.tensor([-1.0, 1.0, 0.0, 0.0]))


@pytest.mark.parametrize("value", [0.1, 0.3, 1.5, -7.0, 0.0])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_group_is_exactly_zero_never_nan(value, scale):
    a = grpo.group_advantages(torch.full((8,), value), 8, scale, eps=0.0)
    assert torch.equal(a, torch.zeros(8))


def test_k3_value_and_gradient():
    logp = torch.tensor([math.log(0.5), math.log(0.3)], requires_grad=True)
    ref = torch.tensor([math.log(0.25), math.log(0.3)])
    kl = grpo.k3_kl(logp, ref)
    # delta = log(0.25 / 0.5): exp(delta) - delta - 1 = 0.5 + ln 2 - 1 = 0.193147; equal -> 0
    assert kl[0].item() == pytest.approx(0.5 + math.log(2) - 1, rel=1e-6)
    assert kl[1].item() == 0.0
    kl.sum().backward()
    # d/dlogp = 1 - exp(ref - logp): 1 - 0.5 = 0.5, and 0 where the two agree
    assert torch.allclose(logp.grad, torch.tensor([0.5, 0.0]))


def test_k3_is_never_negative():
    logp, ref = torch.randn(1000) * 3, torch.randn(1000) * 3
    assert (grpo.k3_kl(logp, ref) >= 0).all()


@pytest.mark.parametrize("ratio, adv, eps_high, loss, grad, low, high", [
    (1.5, 1.0, 0.2, -1.2, 0.0, False, True),     # above 1 + eps with A > 0: clipped, no gradient
    (0.5, -1.0, 0.2, 0.8, 0.0, True, False),     # below 1 - eps with A < 0: clipped
    (0.5, 1.0, 0.2, -0.5, -0.5, False, False),   # below with A > 0: min picks the unclipped term
    (1.5, -1.0, 0.2, 1.5, 1.5, False, False),    # above with A < 0: unclipped, gradient rho * -A
    (1.25, 1.0, 0.2, -1.2, 0.0, False, True),    # clipped at 1.2 ...
    (1.25, 1.0, 0.28, -1.25, -1.25, False, False),  # ... but not with DAPO's clip-higher 0.28
    (1.0, 2.0, 0.2, -2.0, -2.0, False, False),   # ratio 1: loss -A, gradient -A
])
def test_clipped_surrogate(ratio, adv, eps_high, loss, grad, low, high):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    out, is_low, is_high = grpo.clipped_surrogate(logp, torch.tensor([adv]), 0.2, eps_high)
    out.sum().backward()
    assert out.item() == pytest.approx(loss, rel=1e-6)
    # d loss / d logp = -A * rho unclipped
    assert logp.grad.item() == pytest.approx(grad, rel=1e-6, abs=1e-7)
    assert (is_low.item(), is_high.item()) == (low, high)


def test_aggregation_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # grpo: (6/3 + 4/1) / 2 = 3; dapo: 10 / 4 = 2.5; dr_grpo: 10 / (2 * 5) = 1
    denominators = {t: grpo.loss_denominator(mask, t, max_new_tokens=5).item()
                    for t in ("grpo", "dapo", "dr_grpo")}
    assert denominators == {"grpo": 2, "dapo": 4, "dr_grpo": 10}
    assert grpo.aggregate_loss(per_token, mask, "grpo", 2).item() == pytest.approx(3.0)
    assert grpo.aggregate_loss(per_token, mask, "dapo", 4).item() == pytest.approx(2.5)
    assert grpo.aggregate_loss(per_token, mask, "dr_grpo", 10).item() == pytest.approx(1.0)


def test_dr_grpo_denominator_is_constant_under_dapo_filters():
    """Dr. GRPO divides by every completion sampled x max_new_tokens (TRL: rows x
    max_completion_length), so leaving completions out never scales up the others' update."""
    mask = torch.ones(4, 3)
    zero_std, truncated = torch.tensor([True, False]), torch.tensor([False, False, True, False])
    # one completion of four left
    filtered = grpo.loss_mask(mask, zero_std, truncated, True, True)
    assert (grpo.loss_denominator(filtered, "dr_grpo", 8).item()
            == grpo.loss_denominator(mask, "dr_grpo", 8).item() == 32)
    assert (grpo.loss_denominator(filtered, "grpo", 8).item() == 1
            and grpo.loss_denominator(filtered, "dapo", 8).item() == 3)
    per_token = torch.full((4, 3), 2.0)
    # the kept completion's 3 tokens: 3 * 2 / 32, whatever the filters removed
    assert grpo.aggregate_loss(per_token, filtered, "dr_grpo", 32).item() == pytest.approx(6 / 32)


def test_grpo_loss_adds_beta_times_kl():
    logp = torch.tensor([[math.log(0.5), math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    mask = torch.ones(1, 2)
    loss, stats = loss_of(logp, logp, ref, torch.tensor([1.0]), mask, 2, beta=0.5, loss_type="dapo")
    # surrogate -1 per token; KL 0.193147 and 0 -> (-2 + 0.5 * 0.193147) / 2
    assert loss.item() == pytest.approx((-2 + 0.5 * (0.5 + math.log(2) - 1)) / 2, rel=1e-6)
    assert stats["kl"] == pytest.approx(0.5 + math.log(2) - 1, rel=1e-6)
    no_kl, stats = loss_of(logp, logp, None, torch.tensor([1.0]), mask, 1, beta=0.0)
    assert no_kl.item() == pytest.approx(-1.0) and "kl" not in stats


def test_completion_mask_pad_equal_to_eos_and_no_eos():
    eos = torch.tensor([2])
    ids = torch.tensor([[5, 6, 2, 2, 2],     # pad == eos: only the first counts
                        [5, 6, 7, 8, 9],     # no EOS: truncated, all kept
                        [2, 2, 2, 2, 2],     # EOS first
                        [5, 2, 0, 0, 0]])    # a distinct pad 0
    assert torch.equal(engine.completion_mask(ids, eos), torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float))
    # several stop tokens (e.g. <|im_end|> and <|endoftext|>)
    assert torch.equal(engine.completion_mask(torch.tensor([[5, 3, 2]]), torch.tensor([2, 3])),
                       torch.tensor([[1.0, 1.0, 0.0]]))


def test_dapo_filters():
    mask = torch.ones(4, 3)
    zero_std = torch.tensor([True, False])           # G = 2: the first group's rewards were equal
    truncated = torch.tensor([False, False, True, False])
    assert torch.equal(grpo.loss_mask(mask, zero_std, truncated, False, False), mask)
    assert grpo.loss_mask(mask, zero_std, truncated, True, False).sum(1).tolist() == [0, 0, 3, 3]
    assert grpo.loss_mask(mask, zero_std, truncated, False, True).sum(1).tolist() == [3, 3, 0, 3]
    assert grpo.loss_mask(mask, zero_std, truncated, True, True).sum(1).tolist() == [0, 0, 0, 3]


def test_lr_schedule():
    f = lambda s: grpo.lr_factor(s, warmup_steps=4, total_steps=14, min_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert (f(4) == 1.0 and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
            and f(50) == pytest.approx(0.1))


def test_sync_reference():
    policy, ref = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in ref.parameters()]
    grpo.sync_reference(ref, policy, 0.25)
    for r, b, p in zip(ref.parameters(), before, policy.parameters()):
        assert torch.allclose(r, 0.75 * b + 0.25 * p)
    grpo.sync_reference(ref, policy, 1.0)
    for r, p in zip(ref.parameters(), policy.parameters()):
        assert torch.equal(r, p)


def test_lengths_of_right_and_wrong_completions_by_hand():
    """completion_len_correct / _wrong: the mean length of each side, null for a side with none."""
    def row(correct):
        update = grpo.Update({}, None, 0, False)
        counts = {"loss_tokens": 0.0, "tokens": 24.0, "entropy": 0.0, "reward_errors": 0, "prompts_cut": 0,
                  "reflecting": 0}
        whole = {"rewards": torch.tensor(correct), "scores": {"accuracy": torch.tensor(correct)},
                 "correct": torch.tensor(correct), "zero_std": torch.tensor([False, False]),
                 "lengths": torch.tensor([3, 5, 7, 9]), "truncated": torch.zeros(4, dtype=torch.bool),
                 "tool_calls": torch.zeros(4), "tool_errors": torch.zeros(4)}
        return runs.step_metrics(1, whole, counts, update, (0.0, 1.0, 1.5, 2.0, 3.0))
    mixed = row([1.0, 0.0, 1.0, 0.0])
    assert mixed["completion_len_correct"] == 5.0 and mixed["completion_len_wrong"] == 7.0
    none_right = row([0.0, 0.0, 0.0, 0.0])
    assert none_right["completion_len_correct"] is None and none_right["completion_len_wrong"] == 6.0
    assert none_right["loss"] is None and none_right["tokens_per_sec"] == 8.0
