"""Memory of a GRPO run with and without LoRA, on the ~27M Llama of bench/decode.py (random
weights, the demo's tokenizer), each run in its own process so that its peak is its own.

  python bench/lora_memory.py                  # CPU: peak resident memory (RSS) over the imports
  python bench/lora_memory.py --device=cuda    # GPU: torch.cuda.max_memory_allocated

Reported per run: trainable parameters; the bytes that scale with the model, counted (weights,
gradients, AdamW's two moments, the reference copy); measured, the bytes of every tensor alive
right after a policy update (those, plus anything else the run holds); and the peak: on CPU the peak
resident memory less the memory after importing torch, transformers, peft and grpo (Linux
/proc/self/status), so that both runs start from the same baseline; on CUDA the peak allocated.
Full fine-tuning keeps
fp32 weights + fp32 gradients + 2 fp32 Adam moments + a reference copy (20 bytes per parameter
here, fp32 reference); LoRA keeps the weights once and the rest only for the adapters.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = r"""
import json, os, sys
import torch, transformers, peft  # imported by both runs, before the baseline


def status(key):  # kB from /proc/self/status: VmRSS now, VmHWM the peak so far
    with open("/proc/self/status") as f:
        return 1024 * int(next(line for line in f if line.startswith(key)).split()[1])


def live_tensor_bytes():  # every tensor alive: weights, gradients, Adam state, the reference, caches
    import gc
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values())


sys.path.insert(0, os.path.dirname(sys.argv[1]))
import grpo
baseline, live, update = status("VmRSS"), [0], grpo.policy_update


def measured_update(*args, **kwargs):
    result = update(*args, **kwargs)
    live[0] = max(live[0], live_tensor_bytes())
    return result


grpo.policy_update = measured_update
code = grpo.main(sys.argv[2:])
assert not code, code
cuda = torch.cuda.is_available() and "--device=cuda" in sys.argv
peak = torch.cuda.max_memory_allocated() if cuda else status("VmHWM") - baseline
print("PEAK", json.dumps([live[0], peak]))
"""


def build(path):
    import torch
    import transformers

    import data
    tokenizer = transformers.AutoTokenizer.from_pretrained(data.build_tiny_model(tempfile.mkdtemp(), 0))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536,
                                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                                      max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def counted(model_path, lora_rank, beta):
    """(trainable parameters, bytes that scale with the model): fp32 weights, and for each trained
    parameter a gradient and AdamW's two moments; a reference copy when beta > 0 and no LoRA."""
    import engine
    model = engine.load_model(model_path, "cpu")[0]
    total = sum(p.numel() for p in model.parameters())
    if lora_rank:
        engine.add_lora(model, engine.LoraOptions(lora_rank, 2.0 * lora_rank))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = sum(p.numel() for p in model.parameters())
    reference = total if beta > 0 and not lora_rank else 0
    return trainable, 4 * (weights + 3 * trainable + reference)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", default="0,8,64", help="LoRA ranks to run; 0 = full fine-tuning")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    import torch
    import transformers
    work = tempfile.mkdtemp()
    model_path = os.path.join(work, "model27m")
    params = build(model_path)
    print(f"device {args.device}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; model {params / 1e6:.1f}M parameters, beta 0.04, "
          f"4 prompts x 8 completions x 64 tokens, {args.steps} steps")
    print("| run | trainable parameters | counted: weights + grads + Adam + reference "
          "| live tensors after an update | peak (activations too) | time s |")
    print("|---|---|---|---|---|---|")
    for rank in (int(r) for r in args.ranks.split(",")):
        run_args = [f"--model={model_path}", f"--out_dir={os.path.join(work, f'run{rank}')}",
                    f"--device={args.device}", f"--max_steps={args.steps}", "--prompts_per_step=4",
                    "--group_size=8", "--max_new_tokens=64",
                    "--eval_size=0", "--log_samples_every=0", "--micro_batch_size=32", "--beta=0.04",
                    "--rewards=overlong:1", "--overlong_buffer=32", "--lr=1e-4"]
        if rank:
            run_args += [f"--lora_rank={rank}", f"--lora_alpha={2 * rank}"]
        start = time.time()
        out = subprocess.run([sys.executable, "-c", CHILD, os.path.join(ROOT, "grpo.py"), *run_args],
                             capture_output=True, text=True, cwd=work)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        live, peak = json.loads(out.stdout.split("PEAK ")[-1])
        trainable, scaled = counted(model_path, rank, 0.04)
        name = f"LoRA r={rank}, alpha={2 * rank}" if rank else "full fine-tuning"
        print(f"| {name} | {trainable / 1e6:.2f}M | {scaled / 2**20:.0f} MiB | {live / 2**20:.0f} MiB | "
              f"{peak / 2**20:.0f} MiB | {time.time() - start:.0f} |")


if __name__ == "__main__":
    main()
