"""Sampling speed: the engine's static-cache decoder (eager, and with its decode step compiled)
against today's path (transformers' forward with its own cache), side by side in one process,
on the same prompts and uniforms, so that the tokens must be equal.

  python bench/decode.py                     # the demo's model and the ~27M Llama, CPU
  python bench/decode.py --device=cuda       # the same on a GPU (bf16 autocast), plus the 0.5B shape

Models are built locally from configs with the demo's tokenizer (no download); the ~27M and
0.5B shapes are bench/trl_compare.py's. Reported: median seconds per sampling call over
--repeats alternating repeats, and the ratio to today's path.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import engine  # noqa: E402
import grpo  # noqa: E402

SHAPES = {  # name: (transformers class, config, prompts x group, new tokens)
    "demo (~1M)": ("LlamaForCausalLM", dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=4), 8, 32),
    "~27M": ("LlamaForCausalLM", dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=8), 4, 128),
    "0.5B shape": ("Qwen2ForCausalLM", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                            num_attention_heads=14, num_key_value_heads=2), 8, 256),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--compile", default="",
                        help="also time the compiled decode step (on by default on CUDA)")
    args = parser.parse_args(argv)
    import transformers
    device = torch.device(args.device)
    shapes = (args.shapes.split(",") if args.shapes
              else [s for s in SHAPES if device.type == "cuda" or "0.5B" not in s])
    compiled = args.compile == "1" or (args.compile == "" and device.type == "cuda")
    tokenizer = transformers.AutoTokenizer.from_pretrained(data.build_tiny_model(tempfile.mkdtemp(), 0))
    bf16 = device.type == "cuda"
    print(f"device {device}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    print("| model | batch x new tokens | today's path s | static cache s | ratio |"
          + (" compiled s | ratio |" if compiled else ""))
    print("|---|---|---|---|---|" + ("---|---|" if compiled else ""))
    for name in shapes:
        kind, shape, prompts, new_tokens = SHAPES[name]
        torch.manual_seed(0)
        config = getattr(transformers, kind.replace("ForCausalLM", "Config"))(
            vocab_size=len(tokenizer), max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
            # no EOS: every row runs the full length
            eos_token_id=len(tokenizer) + 1, bos_token_id=None, **shape)
        model = getattr(transformers, kind)(config).to(device).eval()
        cfg = grpo.Config(template="plain", max_prompt_tokens=512)
        examples = data.load_task("arithmetic", 0)[0][:prompts]
        ids, mask, _ = data.encode_prompts(tokenizer, examples, cfg, device)
        ids, mask = ids.repeat_interleave(args.group_size, 0), mask.repeat_interleave(args.group_size, 0)
        never = torch.tensor([len(tokenizer) + 1], device=device)
        uniforms = torch.rand(len(ids), new_tokens, generator=torch.Generator().manual_seed(0)).to(device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        how = engine.Sampling(new_tokens, never, tokenizer.pad_token_id, 1.0, 1.0, uniforms)
        paths = {"hf": lambda: engine.sample(model, ids, mask, how).tokens,
                 "static": (lambda d: lambda: d.sample(ids, mask, how).tokens)(engine.StaticDecoder(model))}
        if compiled:
            decoder = engine.StaticDecoder(model, compile=True)
            paths["compiled"] = lambda: decoder.sample(ids, mask, how).tokens
        times, outputs = {k: [] for k in paths}, {}
        with autocast:
            for key, fn in paths.items():  # warm-up (and compilation), reported apart
                start = time.perf_counter()
                outputs[key] = fn()
                if key == "compiled":
                    print(f"compile warm-up: {time.perf_counter() - start:.1f} s", file=sys.stderr)
            for _ in range(args.repeats):
                for key, fn in paths.items():
                    start = engine_clock(device)
                    fn()
                    times[key].append(engine_clock(device) - start)
        same = all(torch.equal(outputs["hf"], out) for out in outputs.values())
        median = {k: statistics.median(v) for k, v in times.items()}
        row = (f"| {name} | {len(ids)} x {new_tokens} | {median['hf']:.3f} | {median['static']:.3f} | "
               f"{median['hf'] / median['static']:.2f}x |")
        if compiled:
            row += f" {median['compiled']:.3f} | {median['hf'] / median['compiled']:.2f}x |"
        print(row + ("" if same else "  (tokens differ!)"), flush=True)


def engine_clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


if __name__ == "__main__":
    main()
