"""
plot.py: a run's metrics.jsonl -> one PNG of reward, accuracy, KL, completion length (with the
reflection rate) and clip fractions over steps. Needs matplotlib (optional: pip install matplotlib).

  python plot.py runs/default                       # writes runs/default/metrics.png
  python plot.py runs/a/metrics.jsonl -o a.png --smooth=20
"""
import argparse
import json
import math
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


class PlotError(Exception):
    """A problem with the input or output that the user must fix; the message names the file."""


def read_rows(path):
    """The rows of a metrics.jsonl: JSON objects with an integer "step", each plotted value a number
    or null. A torn last line (a run still writing it, or killed mid-line) is left out, as a resume
    leaves it; any other line that is not such a row raises PlotError naming its file and line."""
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                if not raw.endswith(b"\n"):  # the last line, torn
                    print(f"plot.py: {path}:{lineno}: a torn last line, left out", file=sys.stderr)
                    break
                raise PlotError(f"{path}:{lineno}: not a JSON line") from None
            if not isinstance(row, dict) or type(row.get("step")) is not int:
                raise PlotError(f"{path}:{lineno}: not a metrics row (a JSON object with an integer step)")
            bad = next((key for _, series in PANELS for key, _ in series
                        if row.get(key) is not None and type(row[key]) not in (int, float)), None)
            if bad:
                raise PlotError(f"{path}:{lineno}: {bad} is {row[bad]!r}, not a number")
            rows.append(row)
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
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
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


def check_output(out):
    """PlotError unless `out` names a picture matplotlib writes (by its extension) in a folder that
    exists and can be written."""
    import matplotlib.pyplot as plt
    kinds = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    folder, kind = os.path.dirname(os.path.abspath(out)), os.path.splitext(out)[1][1:].lower()
    if kind not in kinds:
        raise PlotError(f"{out}: not a picture file matplotlib writes ({', '.join(sorted(kinds))})")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise PlotError(f"{out}: {folder} is no directory that can be written")
    if os.path.isdir(out):
        raise PlotError(f"{out} is a directory")


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
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
    except ImportError:
        print("plot.py: error: plotting needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    out = args.output or os.path.join(os.path.dirname(path), "metrics.png")
    try:
        rows = read_rows(path)
        if not rows:
            raise PlotError(f"{path}: no rows yet")
        check_output(out)
        plot(rows, out, max(1, args.smooth), path)
    except PlotError as err:
        print(f"plot.py: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(rows)} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
