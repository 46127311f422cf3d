"""r1.py (SFT, rejection sampling, distillation, the recipe), the reflection metric, plot.py."""
import itertools
import json

import pytest
import torch

import data
import engine
import grpo
import plot
import r1
import rewards as R
import sft
from conftest import Loaded, stop_at


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def worked_pairs(n, seed=0):
    train = data.load_task("arithmetic", seed, eval_size=50)[0]
    return [{"prompt": e["question"], "completion": e["solution"], "answer": e["answer"]} for e in train[:n]]


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------
# SFT


def test_sft_loss_is_the_mean_nll_of_completion_tokens_only(tiny):
    model, tokenizer = tiny
    cfg = grpo.Config(max_prompt_tokens=200)
    batch = [{"question": "12+34", "solution": "<think>2+4=6</think><answer>46</answer>"},
             {"question": "5+7", "solution": "12"}]
    loss, tokens = sft.sft_loss(engine.Engine(model, tokenizer, grpo.DEFINITION), batch, cfg)
    total, count = 0.0, 0
    for e in batch:  # by hand: each sequence alone, unpadded, the full log-softmax
        prompt = tokenizer(e["question"] + "\n")["input_ids"]
        completion = (tokenizer(e["solution"], add_special_tokens=False)["input_ids"]
                      + [tokenizer.eos_token_id])
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        total -= sum(logp[len(prompt) - 1 + t, token].item() for t, token in enumerate(completion))
        count += len(completion)
    assert tokens == count and loss.item() == pytest.approx(total / count, rel=1e-5)


def test_load_pairs_strips_the_prefill_and_names_bad_lines(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl",
                       [{"prompt": "1+1", "completion": "<think>1+1=2</think><answer>2</answer>"}])
    assert r1.load_pairs(path)[0]["solution"].startswith("<think>")
    assert r1.load_pairs(path, prefill="<think>")[0]["solution"] == "1+1=2</think><answer>2</answer>"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1", "completion": "2"}, {"prompt": "2+2"}])
    with pytest.raises(data.DataError, match="bad.jsonl:2: missing or empty string field 'completion'"):
        r1.load_pairs(bad)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(data.DataError, match="no rows"):
        r1.load_pairs(str(tmp_path / "empty.jsonl"))


@pytest.mark.slow
def test_sft_mode_learns_and_writes_a_run(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", worked_pairs(200))
    run = tmp_path / "sft"
    code = r1.main(["sft", f"--data_path={pairs}", f"--out_dir={run}", "--sft_steps=40",
                    "--sft_batch_size=16", "--eval_size=16", "--save_every=20", "--warmup_steps=0"])
    assert code == 0
    rows = read_rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert sum(r["loss"] for r in rows[-5:]) < 0.7 * sum(r["loss"] for r in rows[:5])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pairs"] == 200 and summary["format_after"] > summary["format_before"]
    assert (run / "latest").read_text() == "checkpoint-000040"
    engine.load_model(str(run), "cpu")  # the fine-tuned model, from the run directory
    assert r1.main(["sft", f"--data_path={pairs}", f"--out_dir={run}"]) == 2  # never mixes two runs


# ----------------------------------------------------------------------------
# rejection sampling and distillation


def test_longest_repeat():
    assert r1.longest_repeat("one two three") == 0                   # shorter than a span
    assert r1.longest_repeat("a b c d e f g h") == 1
    # 36 tokens, period 6: spans at 0, 6, 12, 18, 24
    assert r1.longest_repeat("wait, let me check. " * 6) == 5


@pytest.mark.parametrize("text, truncated, expected", [
    ("<think>2+4=6</think><answer>46</answer>", False, "kept"),
    ("<think>2+4=6</think><answer>47</answer>", False, "wrong"),
    ("46", False, "format"),
    ("<think>двa плюс четыре</think><answer>46</answer>", False, "language"),
    ("<think>" + "wait, let me check 2+4=6. " * 5 + "</think><answer>46</answer>", False, "repetition"),
    ("<think>2+4=6</think><answer>46</answer>", True, "truncated"),
])
def test_rejection_filters(text, truncated, expected):
    cfg = r1.R1Config()
    assert r1.verdict(text, {"question": "12+34", "answer": "46"}, truncated, cfg, set()) == expected


@pytest.mark.parametrize("answer, expected", [
    ("3*8", "kept"),            # right, though the GSM8K rule reads no number 24 in it
    ("1+1 = 24", "wrong"),      # ends in the target, uses neither number: the GSM8K rule would keep it
    ("3+8", "wrong"),
])
def test_rejection_sampling_judges_countdown_by_its_own_rule(answer, expected):
    cfg = r1.R1Config(task="countdown")
    example = {"question": "Using the numbers [3, 8], create an equation that equals 24.", "answer": "24",
               "numbers": [3, 8], "target": 24}
    assert r1.verdict(f"<think>3 times 8</think><answer>{answer}</answer>", example, False, cfg,
                      set()) == expected


def test_duplicates_are_dropped_ignoring_whitespace():
    cfg, seen, example = r1.R1Config(), set(), {"question": "12+34", "answer": "46"}
    assert r1.verdict("<think>2+4=6</think><answer>46</answer>", example, False, cfg, seen) == "kept"
    assert r1.verdict("<think>2+4=6</think>  <answer>46</answer>\n", example, False, cfg, seen) == "duplicate"


def scripted_sampler(tokenizer, per_prompt):
    """A stand-in for grpo.sample: completion j of each prompt is per_prompt(question)[j], as ids."""
    def fake_sample(model, prompt_ids, prompt_mask, how):
        questions = [tokenizer.decode(row[m.bool()]).strip() for row, m in zip(prompt_ids, prompt_mask)]
        k = questions.count(questions[0])
        texts = [per_prompt(q)[i % k] for i, q in enumerate(questions)]
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"]
                + ([] if t.endswith("...") else [tokenizer.eos_token_id])
                for t in texts]
        width = max(map(len, rows))
        tokens = torch.tensor([r + [how.pad_id] * (width - len(r)) for r in rows])
        return engine.Sampled(tokens, torch.zeros(tokens.shape), torch.zeros(tokens.shape))
    return fake_sample


def test_rejection_sampling_then_distillation_into_another_tokenizer(tmp_path, tiny_dir, monkeypatch):
    """Teacher: the tiny Llama with a character tokenizer. Its kept samples, as text, fine-tune a
    Qwen2-shaped student with a chat template and other special tokens."""
    def per_prompt(question):
        a, b = map(int, question.split("+"))
        good = f"<think>{a}+{b}</think><answer>{a + b}</answer>"
        return [good, good + " ", f"<think>x</think><answer>{a + b + 1}</answer>", good[:-9] + "..."]
    _, tokenizer = engine.load_model(tiny_dir, "cpu")
    scripted = grpo.DEFINITION._replace(sample=scripted_sampler(tokenizer, per_prompt))
    monkeypatch.setattr(grpo, "DEFINITION", scripted)
    kept = tmp_path / "kept.jsonl"
    assert r1.main(["sample", f"--model={tiny_dir}", f"--output={kept}", "--samples=4", "--sample_prompts=10",
                    "--eval_batch_size=12", "--max_new_tokens=32", "--decoder=hf"]) == 0  # the scripted path
    rows, report = read_rows(kept), read_rows(str(kept) + ".report.jsonl")
    assert len(rows) == 10 and all(r["completion"].endswith(f"<answer>{r['answer']}</answer>") for r in rows)
    assert len(report) == 10 and all(r["kept"] == 1 and r["total"] == 4 for r in report)
    assert report[0]["rejected"] == {"duplicate": 1, "wrong": 1, "truncated": 1}
    monkeypatch.undo()

    student = data.build_tiny_model(str(tmp_path / "student"), seed=1, arch="qwen2", chat=True)
    assert engine.load_model(student, "cpu")[1].eos_token != tokenizer.eos_token
    run = tmp_path / "distilled"
    assert r1.main(["sft", f"--model={student}", f"--data_path={kept}", f"--out_dir={run}", "--template=chat",
                    "--system_prompt=", "--sft_steps=12", "--sft_batch_size=10", "--eval_size=8",
                    "--warmup_steps=0", "--max_new_tokens=32"]) == 0
    losses = [r["loss"] for r in read_rows(run / "metrics.jsonl")]
    assert losses[-1] < losses[0]
    assert engine.load_model(str(run), "cpu")[1].chat_template  # the student keeps its own tokenizer


def test_r1_command_line_errors(tmp_path, capsys):
    assert r1.main([]) == 2
    assert r1.main(["sample"]) == 2 and "output: the sample mode needs" in capsys.readouterr().err
    assert r1.main(["sample", "--output=x.jsonl", "--keep_rewards=accuracy,nope"]) == 2
    assert "keep_rewards: unknown reward 'nope'" in capsys.readouterr().err
    assert r1.main(["sft", "--data_path=missing.jsonl"]) == 2
    with pytest.raises(SystemExit):
        r1.main(["sft", "--help"])
    shown = capsys.readouterr().out
    assert "--samples=8" in shown and "--group_size=8" in shown  # its own flags and grpo.py's


@pytest.mark.slow
def test_the_recipe_walks_every_phase(tmp_path, capsys, monkeypatch):
    """The wiring of the phases at 1 % of their length; the models learn too little in that to
    pass the filters, so every sample is kept here (the filters have their own tests)."""
    calls = itertools.count()  # every other one kept: preference pairs, and a reward model filtering too
    monkeypatch.setattr(r1, "verdict", lambda *args: "format" if next(calls) % 2 else "kept")
    cfg = grpo.parse_config([f"--out_dir={tmp_path / 'recipe'}"], r1.R1Config)
    results = r1.recipe(cfg, scale=0.01)
    prefixes = ["base model", "R1-Zero", "R1 1. cold start", "R1 2. reasoning RL", "R1 3. rejection sampling",
                "R1 4. final RL", "distilled student"]
    assert len(results) == len(prefixes) and all(r["phase"].startswith(p) for r, p in zip(results, prefixes))
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["format"] <= 1 and 0 <= r["greets"] <= 1 for r in results)
    root = tmp_path / "recipe"
    assert all((root / name / "summary.json").exists() for name in ("coherence_rm", "greeting_rm"))
    assert json.loads((root / "r1_final" / "train_config.json").read_text())["rewards"].endswith(
        f"rm:{root / 'greeting_rm'}:0.1")
    out = capsys.readouterr().out
    assert "---- recipe: held-out greedy accuracy, format and greeting rate after each phase" in out
    assert json.loads((tmp_path / "recipe" / "recipe.json").read_text()) == results
    with pytest.raises(grpo.ConfigError, match="is not empty"):
        r1.recipe(cfg, scale=0.01)


# ----------------------------------------------------------------------------
# observability: reflection markers, plots


@pytest.mark.parametrize("text, expected", [
    ("<think>7+8=15, wait, 7+8 is 15</think><answer>15</answer>", True),
    ("<think>Let me double-check: 15</think><answer>15</answer>", True),
    ("<think>Hmm. so 15</think><answer>15</answer>", True),
    ("<think>the waiter checks 15</think><answer>15</answer>", False),   # words, not substrings
    ("<think>15</think><answer>15 wait</answer>", False),               # only the reasoning counts
    ("no tags, let me verify: 15", True),
])
def test_reflection_markers(text, expected):
    assert R.reflects(text) is expected


def test_reflection_rate_is_logged(tmp_path, monkeypatch):
    real_decode = data.decode
    monkeypatch.setattr(data, "decode",
                        lambda *a: [t + (" wait" if i % 2 else "") for i, t in enumerate(real_decode(*a))])
    assert grpo.main(["--sft_steps=0", "--max_steps=2", "--eval_size=0", "--prompts_per_step=2",
                      "--group_size=4", "--max_new_tokens=8", f"--out_dir={tmp_path}"]) == 0
    assert [r["reflection_frac"] for r in read_rows(tmp_path / "metrics.jsonl")] == [0.5, 0.5]


def test_smoothing():
    assert plot.smoothed([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert plot.smoothed([1.0, 2.0], 1) == [1.0, 2.0]


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "reward_mean": s / 10, "accuracy": s / 20, "kl": 0.01 * s,
             "completion_len_mean": 20 + s, "reflection_frac": 0.0, "clip_low_frac": 0.0,
             "clip_high_frac": 0.01, **({"eval_accuracy": 0.5} if s == 5 else {})}
            for s in range(1, 11)]
    write_jsonl(tmp_path / "metrics.jsonl", rows)
    assert plot.main([str(tmp_path), "--smooth=3"]) == 0
    with open(tmp_path / "metrics.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot.main([str(tmp_path / "none.jsonl")]) == 2 and "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# r1.py sample's options are checked, its output first, before any sampling


@pytest.mark.parametrize("args, problem", [
    (["--samples=0"], "samples: must be at least 1"),
    (["--samples=-1"], "samples: must be at least 1"),
    (["--max_repeats=-1"], "max_repeats: must not be negative (0 = no check)"),
    (["--sample_prompts=-2"], "sample_prompts: must not be negative"),
    (["--output=/nonexistent/kept.jsonl"], "output: /nonexistent/kept.jsonl: /nonexistent is not"),
    (["--output=TMP"], "output: TMP is a directory"),
    (["--output=TMP/rows.jsonl", "--task=jsonl", "--data_path=TMP/rows.jsonl"],
     "output: TMP/rows.jsonl is the data it samples from"),
])
def test_sample_options_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, args, problem):
    (tmp_path / "rows.jsonl").write_text('{"prompt": "1+1", "answer": 2}\n' * 300)
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    if not any(a.startswith("--output") for a in args):
        args.append(f"--output={tmp_path / 'kept.jsonl'}")
    monkeypatch.setattr(r1, "open_policy", lambda *a: pytest.fail("the model loaded"))
    assert r1.main(["sample", "--model=tiny", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("r1.py: error: " + problem.replace("TMP", str(tmp_path))) and "\n" not in err, err


def test_sample_reads_its_batch_size_without_an_evaluation(tmp_path, monkeypatch):
    stop_at(monkeypatch, r1, "open_policy")
    with pytest.raises(Loaded):
        r1.main(["sample", "--model=tiny", "--eval_size=0", "--eval_batch_size=256",
                 f"--output={tmp_path / 'kept.jsonl'}"])


def test_options_of_another_mode_are_refused(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": "1+1", "completion": "2"}\n')
    assert r1.main(["sft", "--model=tiny", "--samples=4", f"--data_path={tmp_path}/p.jsonl"]) == 2
    assert capsys.readouterr().err.strip() == ("r1.py: error: samples: 4 would be ignored: "
                                               "only `r1.py sample` reads it")


# ----------------------------------------------------------------------------
# plot.py: what a live or killed run leaves is read; anything else is one line


def test_plot_skips_a_torn_last_line_and_refuses_what_is_no_metrics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    good = "".join(json.dumps({"step": s, "reward_mean": s / 10, "kl": None}) + "\n" for s in range(1, 6))
    cases = [(good + '{"step": 6, "rew', 0, "a torn last line, left out"),
             (good + "[1, 2]\n", 2, ":6: not a metrics row (a JSON object with an integer step)"),
             (good + '{"reward_mean": 1}\n', 2, ":6: not a metrics row"),
             (good + '{"step": "7"}\n', 2, ":6: not a metrics row"),
             (good + '{"step": 7, "kl": "high"}\n', 2, ":6: kl is 'high', not a number"),
             (good + "{not json\n" + good, 2, ":6: not a JSON line"),
             (b"\xff\xfe\x00binary\n", 2, ":1: not a JSON line")]
    for text, code, said in cases:
        path = tmp_path / "metrics.jsonl"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        assert plot.main([str(path), "-o", str(tmp_path / "m.png")]) == code
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    path.write_text(good + '{"step": 6, "reward_mean": NaN}\n')
    assert plot.main([str(path), "-o", str(tmp_path / "m.png")]) == 0
    for out, said in [(tmp_path / "missing" / "m.png", "is no directory that can be written"),
                      (tmp_path / "m.xyz", "not a picture file matplotlib writes"),
                      (tmp_path, "not a picture")]:
        assert plot.main([str(path), "-o", str(out)]) == 2
        assert said in capsys.readouterr().err
