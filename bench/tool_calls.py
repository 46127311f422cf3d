"""What a call to a tool of yours costs: run in a worker process (usercode.Workers, as the trainer
runs it) against inline in the trainer, and a thread per call, side by side in one process, each
the median over alternating repeats; what a call that overruns costs the next one (a new worker,
which imports your file again); and what 8 calls that loop forever leave behind for the trainer's
own work: nothing with workers (each killed with its process), spinning threads with threads.

    python bench/tool_calls.py                      # an echo tool: the cost of the protocol itself
    python bench/tool_calls.py --calls=64 --workers=8
"""
import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import usercode  # noqa: E402

TOOL = "def echo(text):\n    return text.upper()\ndef spin(text):\n    while True:\n        pass\n"


def in_threads(fn, texts):
    """A thread per call, all waited on: how a tool ran inside the trainer before workers."""
    answers = [None] * len(texts)

    def work(i, text):
        answers[i] = fn(text)
    threads = [threading.Thread(target=work, args=(i, text), daemon=True) for i, text in enumerate(texts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def trainer_work(repeats=7):
    """The median time of a fixed piece of the trainer's Python work (a stand-in for a step's)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sum(i * i for i in range(300_000))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=64, help="calls in one round (a step's rows that call)")
    parser.add_argument("--workers", type=int, default=8, help="tool_workers")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    path = os.path.join(tempfile.mkdtemp(), "tools.py")
    with open(path, "w") as f:
        f.write(TOOL)
    echo = usercode.load_function(path, "echo", takes=("text",))
    pool = usercode.Workers([(path, "echo"), (path, "spin")], 0.2, 1000, args.workers)
    texts = [f"call {i}" for i in range(args.calls)]
    ways = {"inline": lambda: [echo(text) for text in texts],
            "a thread per call": lambda: in_threads(echo, texts),
            "worker processes": lambda: pool.map([(0, text) for text in texts])}
    ways["worker processes"]()  # the workers start (and import the file) once, before timing
    times = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            start = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - start)
    print(f"{args.calls} calls a round, {args.workers} workers, median of {args.repeats} (µs per call):")
    inline = statistics.median(times["inline"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"  {name:<20} {1e6 * median / args.calls:9.1f}   {median / inline:8.1f}x inline")
    restarts = []
    for _ in range(5):
        pool.map([(1, "")] * args.workers)  # every worker overruns and is killed
        start = time.perf_counter()
        pool.map([(0, "after")])  # the next call starts a new worker
        restarts.append(time.perf_counter() - start)
    print(f"  a call after its worker was killed (a new process imports the file): "
          f"{1e3 * statistics.median(restarts):.1f} ms")
    spin = usercode.load_function(path, "spin", takes=("text",))
    before = trainer_work()
    pool.map([(1, "")] * 8)  # 8 calls that never return, each killed at the timeout
    workers = trainer_work()
    for _ in range(8):  # the same 8 as threads: each is left spinning after its wait times out
        threading.Thread(target=spin, args=("",), daemon=True).start()
    threads = trainer_work()
    print(f"the trainer's own work after 8 calls that loop forever: {1e3 * before:.0f} ms before; "
          f"{1e3 * workers:.0f} ms with workers ({workers / before:.2f}x), "
          f"{1e3 * threads:.0f} ms with threads ({threads / before:.2f}x)")
    pool.close()


if __name__ == "__main__":
    main()
