"""Sampling with decoder=vllm beside the engine's own samplers (static KV cache, transformers'
path), side by side in one process on the same prompts, and vLLM's weight push per step.
Runs in requirements-vllm.txt's venv:

    python bench/vllm_sampling.py --model=$(../shared/tools/smollm2.sh)   # + the demo's model
    python bench/vllm_sampling.py --repeats=1 --new_tokens=8              # the demo's model only

Every row samples its full length (no stop id), at temperature 1: prompts x group completions of
new_tokens tokens. Reported: median seconds per sampling call over --repeats alternating
repeats, and the seconds of one weight push (after a change to every weight, as an optimizer step
makes). The first call of each sampler (vLLM's warm-up) is left out and reported apart.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import engine  # noqa: E402
import grpo  # noqa: E402
import vllm_sampler  # noqa: E402


def one_model(name, path, args):
    model, tokenizer = engine.load_model(path, "cpu")
    model.eval()
    cfg = grpo.Config(template="plain" if name == "demo" else "chat", max_prompt_tokens=512)
    examples = data.load_task("arithmetic", 0)[0][:args.prompts]
    ids, mask, _ = data.encode_prompts(tokenizer, examples, cfg, "cpu")
    ids, mask = ids.repeat_interleave(args.group_size, 0), mask.repeat_interleave(args.group_size, 0)
    never = torch.tensor([len(tokenizer) + 1])
    how = engine.Sampling(args.new_tokens, never, tokenizer.pad_token_id, 1.0, 1.0)
    how = how._replace(uniforms=engine.draw_uniforms(ids, how))
    options = types.SimpleNamespace(vllm_gpu_memory_utilization=args.memory, vllm_sleep=False)
    start = time.perf_counter()
    vllm = vllm_sampler.VllmSampler(path, model, options, False, engine.merged_weights)
    started = time.perf_counter() - start
    static = engine.StaticDecoder(model, grpo.DEFINITION)
    paths = {"hf": lambda: grpo.sample(model, ids, mask, how),
             "static": lambda: static.sample(ids, mask, how),
             "vllm": lambda: vllm.sample(model, ids, mask, how)}
    first = {}
    for key, fn in paths.items():
        start = time.perf_counter()
        fn()
        first[key] = time.perf_counter() - start
    times = {key: [] for key in paths}
    for _ in range(args.repeats):
        for key, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    vllm.take_sync_seconds()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0)  # every weight's version moves, as after an optimizer step
    vllm.sync(model)
    push = vllm.take_sync_seconds()
    median = {key: statistics.median(value) for key, value in times.items()}
    params = sum(p.numel() for p in model.parameters())
    print(f"| {name} ({params / 1e6:.0f}M) | {len(ids)} x {args.new_tokens} | {median['hf']:.3f} s | "
          f"{median['static']:.3f} s ({median['hf'] / median['static']:.2f}x) | "
          f"{median['vllm']:.3f} s ({median['hf'] / median['vllm']:.2f}x) | {push * 1000:.0f} ms | "
          f"{started:.1f} s + {first['vllm']:.1f} s |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="a real model's folder (e.g. SmolLM2), beside the demo's")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", type=float, default=0.1, help="vllm_gpu_memory_utilization")
    args = parser.parse_args(argv)
    import transformers
    import vllm
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    print("| model | batch x new tokens | transformers' path | static cache | vLLM | weight push | "
          "vLLM start + first call |")
    print("|---|---|---|---|---|---|---|")
    one_model("demo", data.build_tiny_model(tempfile.mkdtemp(), 0), args)
    if args.model:
        one_model(os.path.basename(args.model.rstrip("/")), args.model, args)


if __name__ == "__main__":
    main()
