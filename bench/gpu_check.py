"""The one-command GPU check: every figure the static decoder's CUDA path is built for, measured in
one run (about 6-8 minutes on one H200), each printed as it is measured and the JSON rewritten
after every section, so that a section that fails (its error is recorded) or a run cut short keeps
what came before.

    python bench/gpu_check.py                      # on a machine with CUDA; writes bench/gpu_check.json
    python bench/gpu_check.py --smoke --device=cpu # the same steps at a tiny size, anywhere (a test runs it)

1. The families on CUDA: for Llama, Qwen2, Qwen3 and Mistral (tiny random models, fp32) the static
   decoder's greedy tokens equal transformers', eager and compiled; how many CUDA graphs were
   recorded (counted in inductor's cudagraph trees).
2. Decoding a Qwen2.5-0.5B-shaped model with its real 151,936-token vocabulary (random weights, no
   download) under bf16 autocast over fp32 weights (so from the engine's bf16 copy), at batch 64
   and 256 (the largest first): tokens/s eager and compiled, as a share of the bound that the
   GPU's copy bandwidth, measured in the same run, sets (step_reads: each step reads every bf16
   weight, the whole KV cache and the [B, V] sampling epilogue); the compile warm-up; the graphs
   compiled; the CUDA graphs recorded.
3. The update's MFU at that shape (bench/gpu_bench.py's measurement).
4. A 40-step GRPO run of that shape with the compiled static decoder (grpo.py itself, through a
   local model folder with a tokenizer of that vocabulary): seconds per step and its split.
5. Where vllm is installed, decoder=vllm on that shape, in a process of its own: tokens/s at both
   batches, one weight push, and the GPU memory in use after sampling with and without sleep mode.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]
import engine  # noqa: E402
import grpo  # noqa: E402
from gpu_bench import SHAPES, ceilings, sync, timed  # noqa: E402

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def family_model(name, vocab, device):
    import transformers
    kind = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[name]
    config = getattr(transformers, kind + "Config")(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=vocab - 1, pad_token_id=0,
        bos_token_id=None, **({"head_dim": 16} if name == "qwen3" else {}))
    torch.manual_seed(0)
    return getattr(transformers, kind + "ForCausalLM")(config).to(device).eval()


def check_families(device):
    """Greedy tokens of the static decoder, eager and compiled, against transformers' path."""
    out = {}
    for name in FAMILIES:
        model = family_model(name, 256, device)
        ids = torch.randint(1, 255, (8, 20), device=device, generator=torch.Generator(device).manual_seed(1))
        mask = torch.ones_like(ids)
        how = engine.Sampling(24, torch.tensor([255], device=device), 0, 0.0)
        theirs = grpo.sample(model, ids, mask, how).tokens
        eager = engine.StaticDecoder(model, grpo.DEFINITION).sample(ids, mask, how).tokens
        graphs = engine.cuda_graphs_recorded(device)
        compiled = engine.StaticDecoder(model, grpo.DEFINITION, compile=True).sample(ids, mask, how).tokens
        out[name] = {"eager_equals_transformers": torch.equal(eager, theirs),
                     "compiled_equals_eager": torch.equal(compiled, eager),
                     "cuda_graphs_recorded": engine.cuda_graphs_recorded(device) - graphs}
    return out


def decode(shape, device, batch, prompt_tokens, new_tokens):
    """Sampling throughput of the static decoder, eager and compiled, from the engine's bf16 copy."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape], max_position_embeddings=4096)).to(device)
    vocab = SHAPES[shape]["vocab_size"]
    tokenizer = type("Stops", (), {"eos_token_id": vocab - 1, "pad_token_id": 0,  # what the engine reads
                                   "batch_decode": lambda self, ids, **_: [""] * len(ids)})()
    bf16 = device.type == "cuda"
    rows = {}
    for compiled in (False, True):
        sampler = engine.Engine(model, tokenizer, grpo.DEFINITION, bf16=bf16, decoder="static",
                                compile_decode=compiled)
        sampler.eos_ids = torch.tensor([vocab + 1], device=device)  # every row runs the full length
        for B in sorted(batch, reverse=True):  # the largest first: the others fit in the memory it took
            prompts = torch.randint(1, vocab - 1, (B, prompt_tokens), device=device)
            compiles, graphs = len(torch._dynamo.utils.counters["stats"]), engine.cuda_graphs_recorded(device)
            start = time.perf_counter()
            sampler.sample(prompts, torch.ones_like(prompts), new_tokens)
            sync(device)
            warm = time.perf_counter() - start
            start = time.perf_counter()
            sampler.sample(prompts, torch.ones_like(prompts), new_tokens)
            sync(device)
            seconds = time.perf_counter() - start
            rows[f"{'compiled' if compiled else 'eager'}_b{B}"] = {
                "tokens_per_s": B * new_tokens / seconds, "seconds": seconds, "first_call_seconds": warm,
                "cuda_graphs_recorded": engine.cuda_graphs_recorded(device) - graphs,
                "dynamo_stats": dict(torch._dynamo.utils.counters["stats"]), "compiles_before": compiles}
            print(json.dumps({f"decode_{'compiled' if compiled else 'eager'}_b{B}": {
                k: rows[f"{'compiled' if compiled else 'eager'}_b{B}"][k] for k in ("tokens_per_s",
                                                                                   "first_call_seconds")}}),
                  flush=True)
    params = sum(p.numel() for p in model.parameters())
    layers, kv = SHAPES[shape]["num_hidden_layers"], SHAPES[shape]["num_key_value_heads"]
    head = SHAPES[shape]["hidden_size"] // SHAPES[shape]["num_attention_heads"]
    return rows, params, 2 * layers * kv * head * 2  # bf16 K and V bytes per token and row


def vllm_decode(shape, device, batches, prompt_tokens, new_tokens, folder):
    """decoder=vllm on the same shape (when vllm is installed): tokens/s per batch, one weight
    push, and the device's used memory awake and asleep (sleep mode, CUDA only)."""
    import types

    import vllm_sampler
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape], max_position_embeddings=4096)).to(device)
    model.save_pretrained(folder)
    vocab, bf16 = SHAPES[shape]["vocab_size"], device.type == "cuda"
    out = {}
    for sleep in ((False, True) if device.type == "cuda" else (False,)):
        options = types.SimpleNamespace(vllm_gpu_memory_utilization=0.3, vllm_sleep=sleep)
        sampler = vllm_sampler.VllmSampler(folder, model, options, bf16, engine.merged_weights)
        for B in batches:
            prompts = torch.randint(1, vocab - 1, (B, prompt_tokens), device=device)
            how = engine.Sampling(new_tokens, torch.tensor([vocab + 1]), 0, 1.0)
            how = how._replace(uniforms=engine.draw_uniforms(prompts, how))
            seconds = timed(lambda: sampler.sample(model, prompts, torch.ones_like(prompts), how), device, 1)
            out[f"sleep{int(sleep)}_b{B}"] = {"tokens_per_s": B * new_tokens / seconds, "seconds": seconds}
        sampler.take_sync_seconds()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0)
        sampler.sync(model)
        out[f"sleep{int(sleep)}_weight_push_s"] = sampler.take_sync_seconds()
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            out[f"sleep{int(sleep)}_used_gib_after_sampling"] = (total - free) / 2**30
        del sampler
    return out


def wide_tokenizer(folder, vocab):
    """The demo's character tokenizer with its vocabulary padded to `vocab` entries (never produced:
    it splits text into characters), so that a model of that vocabulary size trains on the task."""
    import data
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    tiny = PreTrainedTokenizerFast.from_pretrained(data.build_tiny_model(folder, 0))
    state = json.loads(tiny.backend_tokenizer.to_str())
    words = state["model"]["vocab"]
    words.update({f"<x{i}>": i for i in range(len(words), vocab)})
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                        pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    assert len(tokenizer) == vocab and tokenizer("12+3")["input_ids"] == tiny("12+3")["input_ids"]
    return tokenizer


def grpo_run(shape, device, steps, out_dir):
    """grpo.py for `steps` steps on a local folder of the shape (random weights) with a tokenizer of
    its vocabulary, the static decoder compiled: its metrics' medians."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    folder = os.path.join(out_dir, "model")
    tokenizer = wide_tokenizer(os.path.join(out_dir, "tiny"), SHAPES[shape]["vocab_size"])
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    argv = [f"--model={folder}", f"--out_dir={os.path.join(out_dir, 'run')}", f"--max_steps={steps}",
            "--eval_size=16", "--prompts_per_step=8", "--group_size=8", "--max_new_tokens=128", "--lr=1e-6",
            "--log_samples_every=0", f"--save_every={10 ** 6}", f"--device={device.type}",
            "--compile_decode=True"]
    start = time.perf_counter()
    assert grpo.main(argv) == 0
    with open(os.path.join(out_dir, "run", "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f][1:]  # the first step compiles

    def median(key):
        values = sorted(r[key] for r in logged)
        return values[len(values) // 2]
    return {"steps": steps, "wall_seconds": time.perf_counter() - start,
            **{f"median_{k}": median(k) for k in ("t_sample", "t_rewards", "t_logprobs", "t_update")}}


def step_reads(params, kv_bytes, vocab, B, width, new_tokens):
    """The bytes one decode step of the static decoder moves at batch B: every bf16 weight, the whole
    KV cache of width + new_tokens slots (attention reads every slot, masked or not), and the
    sampling epilogue's fp32 [B, V] logits, written and read by softmax and cumsum (~3 passes)."""
    return 2 * params + B * kv_bytes * (width + new_tokens) + 3 * 4 * B * vocab


def section(results, name, output, measure):
    """results[name] = measure(), or the error it raised; the JSON rewritten at once, so that a
    section that fails or a run cut short keeps every figure measured before it."""
    started = time.perf_counter()
    try:
        results[name] = measure()
    except Exception as err:  # a section's failure is a figure too; the others still run
        results[name] = {"error": f"{type(err).__name__}: {str(err).strip()[:500]}"}
    results.setdefault("section_seconds", {})[name] = time.perf_counter() - started
    with open(output, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps({name: results[name]}), flush=True)


def vllm_in_subprocess(args, folder):
    """The vLLM section in a process of its own (two vllm.LLM in one process trip its memory
    profiling, and a crash there must not end this run) -> its results."""
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed (requirements-vllm.txt)"}
    output = os.path.join(folder, "vllm.json")
    subprocess.run([sys.executable, os.path.abspath(__file__), f"--device={args.device}", "--section=vllm",
                    f"--output={output}", *(["--smoke"] if args.smoke else [])], check=True, timeout=600)
    with open(output) as f:
        return json.load(f)["vllm"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that every part runs")
    parser.add_argument("--output", default=os.path.join(HERE, "gpu_check.json"))
    parser.add_argument("--section", choices=("all", "vllm"), default="all")  # vllm: the subprocess's
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape, batches, prompt_tokens, new_tokens, steps = (("tiny", (8, 16), 16, 16, 3) if args.smoke else
                                                        ("qwen2.5-0.5b", (64, 256), 128, 256, 40))
    vocab = SHAPES[shape]["vocab_size"]
    results = {"date": time.strftime("%Y-%m-%d"), "device": str(device), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "shape": shape}
    started, work = time.perf_counter(), tempfile.mkdtemp()
    if args.section == "vllm":
        section(results, "vllm", args.output,
                lambda: vllm_decode(shape, device, batches, prompt_tokens, new_tokens, work))
        return results
    names = ("copy_bandwidth_bytes_s", "bf16_matmul_flop_s")
    section(results, "ceilings", args.output, lambda: dict(zip(names, ceilings(device))))
    bandwidth = results["ceilings"].get("copy_bandwidth_bytes_s")

    def add_shares(table, params, kv_bytes):  # each row's tokens/s as a share of the bandwidth bound
        width = -(-prompt_tokens // 64) * 64  # the static decoder's prompt bucket
        for key, row in table.items():
            if isinstance(row, dict) and "_b" in key and "seconds" in row:
                B = int(key.split("_b")[1])
                read = new_tokens * step_reads(params, kv_bytes, vocab, B, width, new_tokens)
                row["share_of_bound"] = read / bandwidth / row["seconds"] if bandwidth else None
        return table
    section(results, "families", args.output, lambda: check_families(device))

    def decoding():
        rows, params, kv_bytes = decode(shape, device, batches, prompt_tokens, new_tokens)
        results["kv_bytes_per_token_row"], results["params"] = kv_bytes, params
        return add_shares(rows, params, kv_bytes)
    section(results, "decode", args.output, decoding)

    def update():
        import gpu_bench
        path = os.path.join(work, "update.json")
        gpu_bench.main([f"--shape={shape}", f"--device={device.type}", "--modes=eager", "--repeats=1",
                        f"--batch={batches[0]}", f"--prompt_tokens={prompt_tokens}",
                        f"--new_tokens={new_tokens}", f"--output={path}"])
        with open(path) as f:
            return json.load(f)
    section(results, "update", args.output, update)
    try:
        section(results, "grpo_run", args.output, lambda: grpo_run(shape, device, steps, work))
        shape_bytes = (results.get("params", 0), results.get("kv_bytes_per_token_row", 0))
        section(results, "vllm", args.output,
                lambda: add_shares(vllm_in_subprocess(args, work), *shape_bytes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - started
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.output} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
