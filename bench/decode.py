"""Sampling speed: the engine's static-cache decoder (eager, and with its decode step compiled)
against today's path (transformers' forward with its own cache), side by side in one process,
on the same prompts and uniforms, so that the tokens must be equal.

  python bench/decode.py                     # the demo's model and the ~27M Llama, CPU
  python bench/decode.py --device=cuda       # the same on a GPU (bf16 autocast), plus the 0.5B shape
  python bench/decode.py --baseline=COMMIT   # also the static decoder of that commit (from eb4da4d on)

Models are built locally from configs with the demo's tokenizer (no download); the ~27M shape is
bench/trl_compare.py's, the 0.5B shape Qwen2.5-0.5B's with its real 151,936-token vocabulary
(the output head is ~28 % of its weights). Reported: median seconds per sampling call over
--repeats alternating repeats, and the ratio to transformers' path. In fp32 every path must give
the same tokens; under bf16 the static cache keeps bf16 keys and values where transformers keeps
its own dtype, so tokens drift apart after a near tie: the share of equal tokens is reported.
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
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
                                            num_attention_heads=14, num_key_value_heads=2,
                                            vocab_size=151936, tie_word_embeddings=True), 8, 256),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def engine_at(commit):
    """engine.py as it was at `commit` (git show), imported as a module of its own."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:engine.py"], capture_output=True,
                            text=True, check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "engine_baseline.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("engine_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--compile", default="",
                        help="also time the compiled decode step (on by default on CUDA)")
    parser.add_argument("--baseline", default="", help="a commit whose static decoder runs beside today's")
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
    baseline = engine_at(args.baseline) if args.baseline else None
    print("| model | batch x new tokens | transformers s | static cache s | ratio |"
          + (f" static at {args.baseline} s | ratio |" if baseline else "")
          + (" compiled s | ratio |" if compiled else "") + (" equal tokens |" if bf16 else ""))
    print("|---|---|---|---|---|" + ("---|---|" if baseline else "") + ("---|---|" if compiled else "")
          + ("---|" if bf16 else ""))
    for name in shapes:
        kind, shape, prompts, new_tokens = SHAPES[name]
        torch.manual_seed(0)
        config = getattr(transformers, kind.replace("ForCausalLM", "Config"))(
            **{"vocab_size": len(tokenizer), **shape}, max_position_embeddings=2048,
            # no EOS: every row runs the full length
            pad_token_id=tokenizer.pad_token_id, eos_token_id=len(tokenizer) + 1, bos_token_id=None)
        model = getattr(transformers, kind)(config).to(device).eval()
        cfg = grpo.Config(template="plain", max_prompt_tokens=512)
        examples = data.load_task("arithmetic", 0)[0][:prompts]
        ids, mask, _ = data.encode_prompts(tokenizer, examples, cfg, device)
        ids, mask = ids.repeat_interleave(args.group_size, 0), mask.repeat_interleave(args.group_size, 0)
        never = torch.tensor([len(tokenizer) + 1], device=device)
        uniforms = torch.rand(len(ids), new_tokens, generator=torch.Generator().manual_seed(0)).to(device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        how = engine.Sampling(new_tokens, never, tokenizer.pad_token_id, 1.0, 1.0, uniforms)
        paths = {"hf": lambda: grpo.sample(model, ids, mask, how).tokens,
                 "static": (lambda d: lambda: d.sample(ids, mask, how).tokens)(
                     engine.StaticDecoder(model, grpo.DEFINITION))}
        if baseline:
            # a commit from grpo.py's sampler on: engine.py builds on it (engine.Definition)
            then = baseline.StaticDecoder(model, grpo.DEFINITION)
            paths["baseline"] = lambda: then.sample(ids, mask, baseline.Sampling(*how)).tokens
        if compiled:
            decoder = engine.StaticDecoder(model, grpo.DEFINITION, compile=True)
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
        median = {k: statistics.median(v) for k, v in times.items()}
        row = f"| {name} | {len(ids)} x {new_tokens} | {median['hf']:.3f} |"
        for key in [k for k in paths if k != "hf"]:
            row += f" {median[key]:.3f} | {median['hf'] / median[key]:.2f}x |"
        if bf16:  # the share of tokens equal to transformers' own, the least over the paths
            row += f" {min((out == outputs['hf']).float().mean().item() for out in outputs.values()):.0%} |"
        elif not all(torch.equal(outputs["hf"], out) for out in outputs.values()):
            row += "  (tokens differ in fp32: a bug)"
        print(row, flush=True)


def engine_clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


if __name__ == "__main__":
    main()
