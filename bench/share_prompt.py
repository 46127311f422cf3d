"""share_prompt on against off, side by side in one process: the time of sampling, of a no-grad
log-prob pass (the reference's) and of a policy update (forward + backward) on the same batch
of groups, each a median over alternating repeats, as ratios on / off.

    python bench/share_prompt.py                       # the demo's tiny model (random init), CPU
    python bench/share_prompt.py --model=PATH --group_size=16 --max_new_tokens=128

The tiny model's random weights rarely pick EOS, so completions run to max_new_tokens.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import engine  # noqa: E402
import grpo  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help='a local model directory, or "tiny" (built here)')
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--template", default="r1zero", choices=data.TEMPLATES)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    path = args.model
    if path == "tiny":
        path = tempfile.mkdtemp()
        data.build_tiny_model(path, seed=0)
    model, tokenizer = engine.load_model(path, "cpu")
    cfg = grpo.Config(template=args.template, max_prompt_tokens=1024)
    examples = data.load_task("arithmetic", 0)[0][:args.prompts]
    ids, mask, _ = data.encode_prompts(tokenizer, examples, cfg, "cpu")
    ids, mask = ids.repeat_interleave(args.group_size, 0), mask.repeat_interleave(args.group_size, 0)
    eos = engine.stop_ids(model, tokenizer)
    uniforms = torch.rand(len(ids), args.max_new_tokens, generator=torch.Generator().manual_seed(0))
    how = engine.Sampling(args.max_new_tokens, eos, tokenizer.pad_token_id, 1.0, 1.0, uniforms)
    completions = grpo.sample(model, ids, mask, how).tokens
    full = torch.cat([ids, completions], 1)
    attention = torch.cat([mask, torch.ones_like(completions)], 1)
    C = completions.size(1)

    def sampling(share):
        grpo.sample(model, ids, mask, how._replace(share_prompt=share))

    @torch.no_grad()
    def no_grad_pass(share):
        grpo.completion_logprobs(model, full, attention, C, 1.0, share)

    def update(share):
        model.zero_grad(set_to_none=True)
        grpo.completion_logprobs(model, full, attention, C, 1.0, share)[0].sum().backward()

    print(f"{args.prompts} prompts x {args.group_size}, prompt {ids.size(1)} tokens, completions {C} tokens, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{torch.get_num_threads()} threads")
    print("| pass | share_prompt=True s | share_prompt=False s | on / off |\n|---|---|---|---|")
    results = {}
    for name, fn in (("sampling", sampling), ("no-grad log-probs", no_grad_pass),
                     ("update (forward + backward)", update)):
        times = {True: [], False: []}
        fn(True), fn(False)  # warm-up
        for _ in range(args.repeats):
            for share in (True, False):
                start = time.perf_counter()
                fn(share)
                times[share].append(time.perf_counter() - start)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"| {name} | {on:.4f} | {off:.4f} | {on / off:.2f} |", flush=True)
        results[name] = on, off
    return results


if __name__ == "__main__":
    main()
