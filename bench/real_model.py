"""GRPO on a real pretrained model on a CPU: SmolLM2-135M-Instruct, held-out greedy accuracy and
format compliance before and after, one grpo.py run per case.

    python bench/real_model.py --model=$(../shared/tools/smollm2.sh)  # every case, ~60 min on 2 cores
    python bench/real_model.py --model=PATH --cases=one_digit --seeds=0,1,2
    python bench/real_model.py --model=PATH --cases=one_digit --flags=--decoder=vllm  # vLLM's venv

The cases (all: chat template, no cold start, beta 0, lr 1e-5, 4 questions x 6 completions per step):
  one_digit  one-digit sums ("3+7"), no system prompt, accuracy reward only: where the model starts
             between 5 % and 60 % (about 10 %) and GRPO has something to sharpen
  two_digit  two-digit sums, same settings, longer: where the model starts near 0
  products_tools, products_no_tools
             two-digit products with the calculator the system prompt describes, and without it
  r1_format  one-digit sums under R1's system prompt and <think> prefill, with the strict format
             reward, which the model never earns at first (no signal), beside the tags reward's
             partial credit (0.25 per think/answer tag written once), which it does
Accuracy is the task's rule (rewards.answers_match on the last number or the <answer>), format is
R1's strict think/answer structure; both greedy, on held-out sums. Results go to OUT_DIR/real_model.json
and print as a table.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import grpo  # noqa: E402

CALCULATOR = ("You have a calculator: write <tool>EXPRESSION</tool>, e.g. <tool>12*34</tool>, and its result "
              "appears as <result>408</result>. Then write only the final number inside <answer> </answer>.")
COMMON = ["--task=arithmetic", "--template=chat", "--beta=0", "--lr=1e-5", "--warmup_steps=0",
          "--min_lr_ratio=1.0", "--prompts_per_step=4", "--group_size=6", "--log_samples_every=0",
          "--save_every=1000", "--keep_checkpoints=1"]
CASES = {
    "one_digit": ["--digits=1", "--eval_size=30", "--system_prompt=", "--rewards=accuracy:1",
                  "--max_new_tokens=24", "--max_steps=24"],
    "two_digit": ["--digits=2", "--eval_size=60", "--system_prompt=", "--rewards=accuracy:1",
                  "--max_new_tokens=24", "--max_steps=60"],
    "r1_format": ["--digits=1", "--eval_size=30", "--prefill=<think>",
                  "--rewards=accuracy:1,tags:0.5,format:0.5", "--max_new_tokens=64", "--max_steps=40"],
    "plain_format": ["--digits=1", "--eval_size=30", "--prefill=<think>",
                     "--rewards=accuracy:1,tags:0.5,format:0.5", "--max_new_tokens=64", "--max_steps=40",
                     "--system_prompt=Think briefly inside <think> </think>, then write only the final "
                     "number inside <answer> </answer>."],
    # two-digit products with a calculator the instruction describes (no cold start shows it); the
    # same without one: tools= (a call is then text nothing answers)
    "products_tools": ["--task=products", "--eval_size=40", "--rewards=accuracy:1", "--max_new_tokens=64",
                       "--max_steps=40", "--tools=calculator", f"--system_prompt={CALCULATOR}"],
    "products_no_tools": ["--task=products", "--eval_size=40", "--rewards=accuracy:1", "--max_new_tokens=64",
                          "--max_steps=40", "--tools=", f"--system_prompt={CALCULATOR}"],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="a local Hugging Face folder (../shared/tools/smollm2.sh prints one)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out_dir", default="runs/real_model")
    parser.add_argument("--flags", default="", help="more grpo.py flags for every case, e.g. --decoder=vllm")
    args = parser.parse_args(argv)
    results = []
    for case in args.cases.split(","):
        for seed in map(int, args.seeds.split(",")):
            argv = [f"--model={args.model}", *COMMON, *CASES[case], f"--seed={seed}",
                    f"--out_dir={os.path.join(args.out_dir, f'{case}_seed{seed}')}", *args.flags.split()]
            print(f"\n==== {case}, seed {seed}: python grpo.py {' '.join(argv)}", flush=True)
            started = time.time()
            summary = grpo.train(grpo.parse_config(argv))
            rows = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
            results.append({"case": case, "seed": seed, "argv": argv, "minutes": (time.time() - started) / 60,
                             "s_per_step": summary["rl_seconds"] / len(rows),
                             **{k: summary[k] for k in ("accuracy_before", "accuracy_after", "format_before",
                                                        "format_after", "length_before", "length_after")},
                             "train_reward_first_5": sum(r["reward_mean"] for r in rows[:5]) / 5,
                             "train_reward_last_5": sum(r["reward_mean"] for r in rows[-5:]) / 5})
    with open(os.path.join(args.out_dir, "real_model.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n| case | seed | held-out accuracy before → after | format before → after "
          "| mean reward, first → last 5 steps | s/step | minutes |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['seed']} | {r['accuracy_before']:.1%} → {r['accuracy_after']:.1%} "
              f"| {r['format_before']:.1%} → {r['format_after']:.1%} "
              f"| {r['train_reward_first_5']:.2f} → {r['train_reward_last_5']:.2f} | {r['s_per_step']:.1f} "
              f"| {r['minutes']:.1f} |")
    return results


if __name__ == "__main__":
    main()
