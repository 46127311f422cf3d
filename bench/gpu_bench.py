"""Throughput of grpo.py's two hot paths on a randomly initialised model (no download):
sampling (KV-cache decoding) and the policy update (log-probs, loss, backward, AdamW), eager and
torch.compile'd, with peak memory, against the machine's ceilings measured in the same run.
"eager" samples with the static decoder's eager step and updates the plain model; "compiled"
samples with its compiled step (CUDA graphs on CUDA) and updates a torch.compile'd model.

    python bench/gpu_bench.py                                  # Qwen2.5-0.5B shape, CUDA, bf16 autocast
    python bench/gpu_bench.py --modes=eager,compiled,hf_dynamic,hf_static   # + transformers' generate
    python bench/gpu_bench.py --shape=tiny --device=cpu        # a smoke run anywhere

Sampling tokens/s counts generated tokens (every row runs to the length cap). Its bound: each
decode step must read every weight once (bf16: 2 bytes per parameter, autocast caches the casts)
and the KV cache so far, so the step takes at least those bytes / copy bandwidth. Update tokens/s
counts the prompt + completion tokens through forward and backward; MFU is its FLOPs (3 x the
forward's: 2 per parameter per token in the layers, the output head at completion positions only,
causal attention) over the measured bf16 matrix-product rate. `hf_dynamic` / `hf_static` time
transformers' own `generate` (dynamic cache; static cache, which it compiles with CUDA graphs) on
the same prompts, for scale.
"""
import argparse
import contextlib
import json
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import engine  # noqa: E402
import grpo  # noqa: E402

SHAPES = {  # Qwen2.5-0.5B's published config, and a tiny one for smoke runs
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
                         tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    fn()  # warm-up (and compilation)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def ceilings(device):
    """Copy bandwidth (bytes read + written per second) and bf16 matrix-product FLOP/s, measured."""
    if device.type != "cuda":
        return None, None
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), device, 20)
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    matmul_s = timed(lambda: a @ b, device, 10)
    return 2 * src.numel() / copy_s, 2 * 8192**3 / matmul_s


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
    parser.add_argument("--decoder", default="auto", choices=("auto", "static", "hf"),
                        help="sampling path (the engine's static KV cache or transformers')")
    parser.add_argument("--output", default="", help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    shape = SHAPES[args.shape]
    model = Qwen2ForCausalLM(Qwen2Config(**shape, max_position_embeddings=4096)).to(device)
    params = sum(p.numel() for p in model.parameters())
    vocab, hidden, layers = shape["vocab_size"], shape["hidden_size"], shape["num_hidden_layers"]
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    stops = types.SimpleNamespace(eos_token_id=0, pad_token_id=0,  # a tokenizer's part the engine reads
                                  batch_decode=lambda ids, **_: [""] * len(ids))
    samplers = {compiled: engine.Engine(model, stops, grpo.DEFINITION, bf16=device.type == "cuda",
                                        decoder=args.decoder,
                                        compile_decode=compiled) for compiled in (False, True)}
    for sampler in samplers.values():
        sampler.eos_ids = torch.tensor([vocab + 1], device=device)  # no EOS: every row runs the full length
    B, P, T = args.batch, args.prompt_tokens, args.new_tokens
    prompts = torch.randint(0, vocab, (B, P), device=device)
    prompt_mask = torch.ones_like(prompts)
    cfg = grpo.Config(micro_batch_size=args.micro_batch_size, beta=0.0, clip_eps_high=0.2, temperature=1.0,
                      bf16=device.type == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    bandwidth, flops_peak = ceilings(device)

    # the floors: bytes each decode step must read; FLOPs of one update
    body = params - vocab * hidden  # tied embeddings: the table is read once per step, by the output head
    # bf16 K and V
    kv_per_token = layers * 2 * shape["num_key_value_heads"] * (hidden // shape["num_attention_heads"]) * 2
    decode_bytes = sum(2 * params + B * kv_per_token * (P + t) for t in range(T))
    forward_flops = (2 * body * B * (P + T) + 2 * vocab * hidden * B * T
                     + layers * B * 2 * (P + T) ** 2 * hidden)
    results = {"date": time.strftime("%Y-%m-%d"), "shape": args.shape,
               "decoder": "static" if samplers[False].decoder else "hf",
               "parameters": params, "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "torch": torch.__version__, "batch": B, "prompt_tokens": P, "new_tokens": T,
               "copy_bandwidth_gb_s": bandwidth and bandwidth / 1e9,
               "bf16_matmul_tflop_s": flops_peak and flops_peak / 1e12}
    if bandwidth:
        results["sample_tokens_per_s_bound"] = B * T / (decode_bytes / bandwidth)
    print(json.dumps(results), flush=True)
    completions = None
    for mode in args.modes.split(","):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = {}
        if mode.startswith("hf_"):
            def generate():
                with autocast():
                    model.generate(input_ids=prompts, attention_mask=prompt_mask, do_sample=True, top_k=0,
                                   max_new_tokens=T, min_new_tokens=T, pad_token_id=0,
                                   cache_implementation="static" if mode == "hf_static" else None)
            model.eval()
            sample_s = timed(generate, device, args.repeats)
        else:
            net = torch.compile(model, dynamic=True) if mode == "compiled" else model
            sampler = samplers[mode == "compiled"]

            def generate():
                nonlocal completions
                completions = sampler.sample(prompts, prompt_mask, T).tokens

            def update():
                model.train()
                ids = torch.cat([prompts, completions], 1)
                optimizer.zero_grad(set_to_none=True)
                mask = torch.ones_like(completions, dtype=torch.float)
                rollout = grpo.Rollout(ids, torch.ones_like(ids), torch.randn(B, device=device), mask,
                                       None, None, torch.zeros_like(mask))
                grpo.accumulate_gradients(net, rollout, cfg)
                optimizer.step()

            sample_s = timed(generate, device, args.repeats)
            update_s = timed(update, device, args.repeats)
            row.update(update_s=update_s, update_tokens_per_s=B * (P + T) / update_s)
            if flops_peak:
                row["update_mfu"] = 3 * forward_flops / update_s / flops_peak
        if sample_s:
            row.update(sample_s=sample_s, sample_tokens_per_s=B * T / sample_s)
            if bandwidth:
                row["sample_frac_of_bound"] = (row["sample_tokens_per_s"]
                                               / results["sample_tokens_per_s_bound"])
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        results[mode] = row
        print(f"{mode:>10}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if v is not None),
              flush=True)
    print(json.dumps(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
