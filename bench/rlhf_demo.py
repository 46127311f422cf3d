"""RLHF in miniature on the tiny model (CPU, offline): a cold start, preference pairs, a reward model
trained on them, and GRPO with that reward model as its only reward, so the policy never sees the
task's rule; held-out greedy accuracy (by the rule) and the RM's score before and after.

    python bench/rlhf_demo.py --out_dir=runs/rlhf                      # pairs of the model's own samples
    python bench/rlhf_demo.py --out_dir=runs/rlhf2 --pairs=synthetic   # worked sums with one slip

pairs: sampled: r1.py sample --pairs_output, each right completion of the cold-started model over each
wrong one of the same question (the rule stands in for the annotators); synthetic: for each training
sum its worked solution over the same solution with one column's digit off by one (carried through
to the answer), pairs that differ in correctness alone. Results: OUT_DIR/rlhf_demo.json.
"""
import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import grpo  # noqa: E402
import r1  # noqa: E402


def slipped(example, rng):
    """The worked solution of a+b with one column's sum off by one, the answer following the slip."""
    a, b = map(int, example["question"].split("+"))
    column = rng.randrange(len(str(max(a, b))))
    wrong = a + b + rng.choice((-1, 1)) * 10 ** column
    if wrong < 0:
        wrong = a + b + 10 ** column
    steps = data.addition_example(a, b)["solution"].split("</think>")[0][len("<think>"):].split(",")
    total = steps[column].split("=")
    steps[column] = f"{total[0]}={int(total[1]) + (wrong - a - b) // 10 ** column}"
    return f"<think>{','.join(steps)}</think><answer>{wrong}</answer>"


def write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out_dir", default="runs/rlhf_demo")
    parser.add_argument("--pairs", choices=("sampled", "synthetic"), default="sampled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample_temperature", type=float, default=0.7)  # of the sampled pairs
    parser.add_argument("--rm_steps", type=int, default=600)
    parser.add_argument("--rl_steps", type=int, default=200)
    parser.add_argument("--rl_flags", default="--lr=3e-5 --beta=0.1 --temperature=0.7")
    args = parser.parse_args()
    root, started = os.path.abspath(args.out_dir), time.time()
    os.makedirs(root, exist_ok=False)
    train_set = data.load_task("arithmetic", args.seed)[0]
    worked = write(os.path.join(root, "worked.jsonl"), [{"prompt": e["question"], "completion": e["solution"]}
                                                        for e in train_set[:500]])
    cold, prefs, rm, rl = (os.path.join(root, name) for name in ("cold", "prefs.jsonl", "rm", "rl"))
    common = [f"--seed={args.seed}", "--max_new_tokens=32"]
    assert r1.main(["sft", "--model=tiny", f"--data_path={worked}", f"--out_dir={cold}", "--sft_steps=150",
                    "--sft_lr=1e-3", "--warmup_steps=0", *common]) == 0
    if args.pairs == "sampled":
        assert r1.main(["sample", f"--model={cold}", f"--output={root}/kept.jsonl", f"--pairs_output={prefs}",
                        "--samples=8", "--sample_prompts=2000", f"--temperature={args.sample_temperature}",
                        "--eval_batch_size=256",
                        *common]) == 0
    else:
        rng = random.Random(args.seed)
        write(prefs, [{"prompt": e["question"], "chosen": e["solution"], "rejected": slipped(e, rng)}
                      for e in train_set])
    assert r1.main(["reward_model", f"--model={cold}", f"--data_path={prefs}", f"--out_dir={rm}",
                    f"--rm_steps={args.rm_steps}", *common]) == 0
    rl_args = [f"--model={cold}", f"--rewards=rm:{rm}", f"--out_dir={rl}", f"--max_steps={args.rl_steps}",
               "--sft_steps=0", "--eval_every=50", *args.rl_flags.split(), *common]
    summary = grpo.train(grpo.parse_config(rl_args))
    with open(os.path.join(rm, "summary.json")) as f:
        learned = json.load(f)
    with open(os.path.join(rl, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    name = f"reward_rm:{rm}"
    result = {"pairs": args.pairs, "seed": args.seed, "rm_pairs": learned["pairs"],
              "rm_pairwise_accuracy": [learned["pairwise_accuracy_before"], learned["pairwise_accuracy"]],
              "accuracy": [summary["accuracy_before"], summary["accuracy_after"]],
              "rm_score": [summary[f"{name}_before"], summary[f"{name}_after"]],
              "kl_last": rows[-1]["kl"], "eval": [(r["step"], r["eval_accuracy"], r[f"eval_{name}"])
                                                  for r in rows if "eval_accuracy" in r],
              "seconds": time.time() - started}
    write(os.path.join(root, "rlhf_demo.json"), [result])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
