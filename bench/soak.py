"""Long-run soak: thousands of tiny GRPO steps on CPU, watching resident memory and step time.

    python bench/soak.py                      # 3000 steps, a checkpoint every 500
    python bench/soak.py --max_steps=10000    # any grpo.py flag passes through

Runs grpo.py in a child process, samples its resident set size (VmRSS) once a second, and reads
the per-step timings from metrics.jsonl. Prints, per tenth of the run, the median step time and
the memory, then the growth from the first tenth to the last. Flat memory and flat step time
mean no leak and no slowdown.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = ["--max_steps=3000", "--sft_steps=0", "--eval_size=0", "--prompts_per_step=4", "--group_size=4",
            "--max_new_tokens=16", "--rewards=overlong:1,format:1", "--overlong_buffer=16",
            "--save_every=500", "--log_samples_every=0"]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(extra):
    run_dir = tempfile.mkdtemp(prefix="soak-")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    child = subprocess.Popen([sys.executable, os.path.join(HERE, "..", "grpo.py"), *DEFAULTS, *extra,
                              f"--out_dir={run_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = []  # (steps done, RSS MiB)
    while child.poll() is None:
        try:
            with open(metrics) as f:
                done = sum(1 for _ in f)
            samples.append((done, rss_mib(child.pid)))
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(1)
    if child.returncode:
        sys.exit(f"grpo.py exited with {child.returncode}")
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    total = len(rows)
    print(f"{total} steps, run directory {run_dir}")
    print(f"{'steps':>13} {'median step s':>14} {'RSS MiB':>9}")
    tenths = []
    for k in range(10):
        lo, hi = k * total // 10, (k + 1) * total // 10
        step_s = statistics.median(r["t_sample"] + r["t_rewards"] + r["t_logprobs"] + r["t_update"]
                                   for r in rows[lo:hi])
        rss = [m for done, m in samples if lo < done <= hi]
        tenths.append((step_s, max(rss) if rss else float("nan")))
        print(f"{lo + 1:>6}-{hi:<6} {step_s:>14.4f} {tenths[-1][1]:>9.1f}")
    (t0, m0), (t9, m9) = tenths[0], tenths[-1]
    print(f"last tenth vs first: step time {t9 / t0:.2f}x, memory {m9 - m0:+.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1:])
