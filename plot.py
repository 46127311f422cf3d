"""
plot.py: a run's metrics.jsonl -> one PNG of reward, accuracy, KL, completion length (with the
reflection rate) and clip fractions over steps. Needs matplotlib (optional: pip install matplotlib).

  python plot.py runs/default                       # writes runs/default/metrics.png
  python plot.py runs/a/metrics.jsonl -o a.png --smooth=20
"""
import argparse
import json
import os
import sys

PANELS = [  # (title, [(metric, label)])
    ("reward", [("reward_mean", "mean reward")]),
    ("accuracy", [("accuracy", "sampled (train)"), ("eval_accuracy", "greedy (held out)")]),
    ("KL to the reference", [("kl", "k3 KL")]),
    ("completion length", [("completion_len_mean", "mean tokens")]),
    ("reflection", [("reflection_frac", "share with 'wait', 'let me check', ...")]),
    ("clipped tokens", [("clip_low_frac", "ratio < 1 - eps_low"),
                        ("clip_high_frac", "ratio > 1 + eps_high")]),
]


def read_rows(path):
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise SystemExit(f"plot.py: error: {path}:{lineno}: not a JSON line") from None
    return rows


def smoothed(values, window):
    """The mean of the last `window` values at each point (a trailing moving average)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(rows, out_path, window=1, title=""):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (name, series) in zip(axes.flat, PANELS):
        for key, label in series:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, smoothed(list(values), window if key != "eval_accuracy" else 1), label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def main(argv):
    parser = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", help="metrics.jsonl, or the run directory holding it")
    parser.add_argument("-o", "--output", help="PNG path (default: metrics.png beside the metrics)")
    parser.add_argument("--smooth", type=int, default=1,
                        help="moving-average window in steps (default 1: raw)")
    args = parser.parse_args(argv)
    path = os.path.join(args.metrics, "metrics.jsonl") if os.path.isdir(args.metrics) else args.metrics
    if not os.path.isfile(path):
        print(f"plot.py: error: {path}: no such file", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot.py: error: plotting needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    rows = read_rows(path)
    if not rows:
        print(f"plot.py: error: {path}: no rows yet", file=sys.stderr)
        return 2
    out = plot(rows, args.output or os.path.join(os.path.dirname(path), "metrics.png"), max(1, args.smooth),
               path)
    print(f"wrote {out} ({len(rows)} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
