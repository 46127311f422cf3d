"""The one-command GPU check: every figure the static decoder's CUDA path is built for, measured in
one run (about 6-8 minutes on one H200), printed and saved as JSON.

    python bench/gpu_check.py                      # on a machine with CUDA; writes bench/gpu_check.json
    python bench/gpu_check.py --smoke --device=cpu # the same steps at a tiny size, anywhere (a test runs it)

1. The families on CUDA: for Llama, Qwen2, Qwen3 and Mistral (tiny random models, fp32) the static
   decoder's greedy tokens equal transformers', eager and compiled; whether CUDA graphs were
   captured (torch's inductor counts each graph it declines).
2. Decoding a Qwen2.5-0.5B-shaped model with its real 151,936-token vocabulary (random weights, no
   download) under bf16 autocast over fp32 weights (so from the engine's bf16 copy), at batch 64
   and 256: tokens/s eager and compiled, as a share of the bound that the GPU's copy bandwidth,
   measured in the same run, sets (each step reads every bf16 weight and the KV cache so far);
   the compile warm-up; the graphs compiled; CUDA graphs captured or not.
3. The update's MFU at that shape (bench/gpu_bench.py's measurement).
4. A 40-step GRPO run of that shape with the compiled static decoder (grpo.py itself, through a
   local model folder with a tokenizer of that vocabulary): seconds per step and its split.
5. Where vllm is installed, decoder=vllm on that shape: tokens/s at both batches, one weight push,
   and the GPU memory in use after sampling with and without sleep mode.
"""
import argparse
import json
import os
import shutil
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
        for B in batch:
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
    params = sum(p.numel() for p in model.parameters())
    layers, kv = SHAPES[shape]["num_hidden_layers"], SHAPES[shape]["num_key_value_heads"]
    head = SHAPES[shape]["hidden_size"] // SHAPES[shape]["num_attention_heads"]
    return rows, params, 2 * layers * kv * head * 2  # bf16 K and V bytes per token and row


def vllm_decode(shape, device, batches, prompt_tokens, new_tokens, folder):
    """decoder=vllm on the same shape (when vllm is installed): tokens/s per batch, one weight
    push, and the device's used memory awake and asleep (sleep mode, CUDA only)."""
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed (requirements-vllm.txt)"}
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that every part runs")
    parser.add_argument("--output", default=os.path.join(HERE, "gpu_check.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape, batches, prompt_tokens, new_tokens, steps = (("tiny", (8, 16), 16, 16, 3) if args.smoke else
                                                        ("qwen2.5-0.5b", (64, 256), 128, 256, 40))
    results = {"date": time.strftime("%Y-%m-%d"), "device": str(device), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "shape": shape}
    started = time.perf_counter()
    results["families"] = check_families(device)
    print(json.dumps({"families": results["families"]}), flush=True)
    rows, params, kv_bytes = decode(shape, device, batches, prompt_tokens, new_tokens)
    bandwidth, flops = ceilings(device)

    def add_shares(table):  # each row's tokens/s as a share of the bandwidth bound at its batch
        for key, row in table.items():
            if isinstance(row, dict) and "_b" in key:
                B = int(key.split("_b")[1])
                read = sum(2 * params + B * kv_bytes * (prompt_tokens + t) for t in range(new_tokens))
                row["share_of_bound"] = read / bandwidth / row["seconds"] if bandwidth else None
    add_shares(rows)
    results.update(decode=rows, copy_bandwidth_gb_s=bandwidth and bandwidth / 1e9,
                   bf16_matmul_tflop_s=flops and flops / 1e12)
    print(json.dumps({"decode": rows}), flush=True)
    import gpu_bench
    update = os.path.join(tempfile.mkdtemp(), "update.json")
    gpu_bench.main([f"--shape={shape}", f"--device={device.type}", "--modes=eager", "--repeats=1",
                    f"--batch={batches[0]}", f"--prompt_tokens={prompt_tokens}", f"--new_tokens={new_tokens}",
                    f"--output={update}"])
    with open(update) as f:
        results["update"] = json.load(f)
    work = tempfile.mkdtemp()
    try:
        results["grpo_run"] = grpo_run(shape, device, steps, work)
        folder = os.path.join(work, "vllm_model")
        results["vllm"] = vllm_decode(shape, device, batches, prompt_tokens, new_tokens, folder)
        add_shares(results["vllm"])
        print(json.dumps({"vllm": results["vllm"]}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - started
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
