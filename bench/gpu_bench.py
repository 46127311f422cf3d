"""Throughput of grpo.py's two hot paths on a randomly initialised model (no download):
sampling (KV-cache decoding) and the policy update (log-probs, loss, backward, AdamW), eager and
torch.compile'd, with peak memory.

    python bench/gpu_bench.py                                  # Qwen2.5-0.5B shape, CUDA, bf16 autocast
    python bench/gpu_bench.py --shape=tiny --device=cpu        # a smoke run anywhere

Prints one line per mode and a JSON summary. Sampling tokens/s counts generated tokens; update
tokens/s counts the prompt + completion tokens that pass through forward and backward.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import grpo  # noqa: E402

SHAPES = {  # Qwen2.5-0.5B's published config, and a tiny one for smoke runs
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def timed(fn, device, repeats):
    fn()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="qwen2.5-0.5b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64, help="completions per step (e.g. 4 prompts x 16)")
    parser.add_argument("--prompt_tokens", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--micro_batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="eager,compiled")
    args = parser.parse_args(argv)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[args.shape], max_position_embeddings=4096)).to(device)
    params = sum(p.numel() for p in model.parameters())
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_tokens), device=device)
    prompt_mask = torch.ones_like(prompts)
    never = torch.tensor([vocab + 1], device=device)  # no EOS: every row runs the full length
    cfg = grpo.Config(micro_batch_size=args.micro_batch_size, beta=0.0, clip_eps_high=0.2, temperature=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    results = {"shape": args.shape, "parameters": params, "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "torch": torch.__version__, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
               "new_tokens": args.new_tokens}
    completions = None
    for mode in args.modes.split(","):
        net = torch.compile(model, dynamic=True) if mode == "compiled" else model
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def generate():
            nonlocal completions
            model.eval()
            with autocast():
                completions = grpo.sample(model, prompts, prompt_mask, args.new_tokens, never, 0)

        def update():
            model.train()
            ids = torch.cat([prompts, completions], 1)
            attention = torch.ones_like(ids)
            optimizer.zero_grad(set_to_none=True)
            grpo.accumulate_gradients(net, ids, attention, completions.size(1), torch.randn(args.batch, device=device),
                                      torch.ones_like(completions, dtype=torch.float), None, None, cfg, autocast)
            optimizer.step()

        sample_s = timed(generate, device, args.repeats) if mode == "eager" or completions is None else None
        update_s = timed(update, device, args.repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        row = {"update_s": update_s, "update_tokens_per_s": args.batch * (args.prompt_tokens + completions.size(1)) / update_s,
               "peak_gib": peak}
        if sample_s:
            row.update(sample_s=sample_s, sample_tokens_per_s=args.batch * completions.size(1) / sample_s)
        results[mode] = row
        print(f"{mode:>9}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if v is not None), flush=True)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
