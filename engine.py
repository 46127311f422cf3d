"""
engine.py: the policy as grpo.py samples it: loading (dtype, attention, pad and stop tokens,
dropout), LoRA, the reference model, and the samplers that must equal grpo.py's own.

grpo.py holds the definition: `sample` (transformers' forward with the model's own KV cache, any
family), `pick_token` and `completion_logprobs`. Here are the faster samplers built on it:
`StaticDecoder`, a KV cache the engine owns with one decode step that picks its own token (Llama,
Qwen2, Qwen3, Mistral; compiled on CUDA), which picks the same tokens from the same uniforms; and
vLLM (vllm_sampler.py), the same greedy tokens (sampled ones are vLLM's own, seeded from the
uniforms). `Engine.sample` runs whichever applies, always wrapped by tools.py's Toolbox (which runs
tools, or without any counts the calls written), and returns what the trainer reads: tokens,
log-probs, entropy, the mask of the policy's own tokens, lengths and the sampler's figures.
Nothing here knows about rewards or the GRPO objective.
"""
import copy
import inspect
import os
import time
import types
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional

import torch

import runs
import tools
from configurator import ConfigError, unread
from distributed import RankFailed, distribute, every_rank_done, sampling_check, say


MIN_TEMPERATURE = 1e-3  # the sampling temperature's floor: below it sampling is greedy in effect


@dataclass
class EngineOptions:
    # the engine: precision, attention, sampling and log-prob passes (engine.py)
    dtype: Literal["float32", "bfloat16"] = "float32"  # the policy trains in fp32 either way; bf16: compute
    bf16: Optional[bool] = None    # bf16 autocast over fp32 weights; None = on CUDA, or with dtype=bfloat16
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # the last needs flash-attn
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    decoder: Literal["auto", "static", "hf", "vllm"] = "auto"  # static: own KV cache; vllm: vllm_sampler.py
    vllm_gpu_memory_utilization: float = 0.3  # vLLM's share of GPU memory (on CPU: of RAM); TRL colocate: 0.3
    vllm_sleep: Optional[bool] = None  # free vLLM's memory between rollouts (sleep mode); None = on CUDA
    compile_decode: Optional[bool] = None  # torch.compile the static decode step; None = on CUDA
    share_prompt: bool = True      # a group's G sequences share one pass over their prompt (same result)
    disable_dropout: bool = True   # dropout off: the update sees the policy that sampled (TRL: the same)
    compile: bool = False          # torch.compile the log-prob forward (no gain measured, ~100 s to compile)
    chunked_head: bool = True      # lmhead.py: log-probs without [B, C, V] logits, where those pass 2^24

    def checks(self):
        vllm = self.decoder == "vllm"
        return [(self.temperature >= MIN_TEMPERATURE,
                 f"temperature: {self.temperature:g} is below {MIN_TEMPERATURE:g}: logits / T leave "
                 "float32's range (and every group's samples are alike, which teaches nothing)"),
                (self.dtype != "bfloat16" or self.bf16 is not False,
                 "bf16: dtype=bfloat16 computes in bf16; bf16=False contradicts it"),
                (not vllm or runs.installed("vllm"),
                 "decoder: vllm needs the vllm package (pip install -r requirements-vllm.txt)"),
                (not vllm or getattr(self, "sharding", "ddp") != "fsdp",
                 "decoder: vllm samples a whole copy of the policy on each rank: not with sharding=fsdp"),
                (0 < self.vllm_gpu_memory_utilization <= 1,
                 "vllm_gpu_memory_utilization: must be in (0, 1]"),
                (self.attn_implementation != "flash_attention_2" or runs.installed("flash_attn"),
                 "attn_implementation: flash_attention_2 needs the flash-attn package"),
                *unread(self, not vllm, ("vllm_gpu_memory_utilization", "vllm_sleep"),
                        f"decoder={self.decoder} is not vllm"),
                *unread(self, self.decoder in ("hf", "vllm"), ("compile_decode",),
                        f"decoder={self.decoder} has no static decode step")]


@dataclass
class LoraOptions:
    # LoRA (needs peft; engine.py): adapters on a frozen base
    lora_rank: int = 0             # rank r of the adapters; 0 = train every weight (arXiv 2106.09685: 1-64)
    lora_alpha: float = 32.0       # the adapters' update is scaled by alpha / rank (peft's default: 8)
    lora_dropout: float = 0.0      # dropout on the adapters' input; > 0 needs disable_dropout=False
    lora_target_modules: str = "all-linear"  # all-linear (every linear layer but the head), or q_proj,v_proj

    def checks(self):
        off = not self.lora_rank
        return [(self.lora_rank >= 0, "lora_rank: must not be negative"),
                (off or runs.installed("peft"), "lora_rank: LoRA needs the peft package (pip install peft)"),
                (off or self.sharding == "ddp",
                 "lora_rank: LoRA runs with sharding=ddp (an adapter is small)"),
                (off or not self.ref_sync_every,
                 "ref_sync_every: with LoRA the reference is the base model with "
                 "adapters off, which cannot move; use 0"),
                (self.lora_alpha > 0, "lora_alpha: must be positive"),
                (0 <= self.lora_dropout < 1, "lora_dropout: must be in [0, 1)"),
                (not self.lora_dropout or not self.disable_dropout,
                 "lora_dropout: dropout needs disable_dropout=False (the update would score another policy)"),
                *unread(self, off, ("lora_alpha", "lora_dropout", "lora_target_modules"),
                        "LoRA is off (lora_rank=0)")]


class Sampling(NamedTuple):
    """How to sample: up to max_new_tokens tokens, a row ending at any of eos_ids [S] (then pad_id);
    temperature 0 is greedy; the top_p nucleus; uniforms [B, max_new_tokens] in [0, 1) pick the
    tokens (drawn when None); share_prompt: repeated prompts are prefilled once (grpo.prefill_prompts)."""
    max_new_tokens: int
    eos_ids: torch.Tensor
    pad_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    uniforms: Optional[torch.Tensor] = None
    share_prompt: bool = True


class Sampled(NamedTuple):
    """What a sampler returns for B prompts: tokens [B, T] (pad after each row's first stop token),
    the sampler's log-prob of each token and the entropy at each position, [B, T] each. As
    Engine.sample returns them, also mask [B, T], 1 on the policy's own tokens up to and including
    the first stop (0 after it, and on a tool's results, whose logp and entropy are 0), lengths
    [B], the tokens up to the stop (results included), and info, the sampler's own figures for the
    logs ({name: [B] tensor}, or a list by row: tools.py's calls, errors and transcripts)."""
    tokens: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    mask: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None
    info: Optional[dict] = None


class Definition(NamedTuple):
    """grpo.py's definitions, which the samplers here are built on (StaticDecoder must give the same
    tokens for the same uniforms, vLLM the same greedy ones): sample(model,
    prompt_ids, prompt_mask, how) -> Sampled; logprobs(model, ids, attention, num_completion,
    temperature, share_prompt, with_entropy) -> (logp, entropy); pick(logits, temperature, top_p,
    uniform, mode) -> (token, logp, entropy) [B] each; picking(temperature, top_p) -> its mode."""
    sample: Callable
    logprobs: Callable
    pick: Callable
    picking: Callable


def draw_uniforms(prompt_ids, how):
    """The uniforms [B, max_new_tokens] that pick the tokens; greedy decoding draws none (zeros),
    so that it leaves the random stream as it was."""
    draw = torch.rand if how.temperature > 0 else torch.zeros
    return draw(len(prompt_ids), how.max_new_tokens, device=prompt_ids.device)


def completion_mask(completion_ids, eos_ids):
    """1 for tokens up to and including each row's first EOS, 0 after it ([B, T] -> [B, T] float).
    Only the first EOS counts, so padding after it is never mistaken for text, even when the
    pad token is the EOS token. A row without EOS (truncated) is all ones."""
    is_eos = torch.isin(completion_ids, eos_ids).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).float()


def positions_of(mask):
    """Position ids of a left-padded attention mask [B, L]: 0 at each row's first real token."""
    return (mask.cumsum(1) - 1).clamp(min=0)


ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}


def can_share_prompts(model):
    """Whether a prompt's cache can be copied to other rows: every layer is attention, whose cache
    is keys and values by row. Hybrid models (LFM2's convolutions, Qwen3-Next's linear attention)
    keep running states that transformers updates in place; they run every row instead."""
    config = getattr(unwrap(model), "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return set(getattr(config, "layer_types", None) or ATTENTION_LAYERS) <= ATTENTION_LAYERS


def shares_prompt_pass(model, share):
    """Whether a log-prob pass runs a group's prompt once (share): where its cache can be copied and
    no layer recomputes activations (gradient checkpointing keeps no cache)."""
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in unwrap(model).modules())
    return share and not checkpointed and can_share_prompts(model)


def cache_name(model):
    """The forward argument that takes the KV cache: transformers 5 names it `cache`, 4.x
    `past_key_values`."""
    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def new_cache(model, share):
    """The cache argument of a prompt's forward pass: for rows to be copied (share), a cache made
    from the config (attention layers, full or sliding, in training mode too); else none, and a
    model builds its own, of the state classes its transformers version has (hybrids)."""
    from transformers import DynamicCache
    config = getattr(unwrap(model), "config", None)
    return {cache_name(model): DynamicCache(config=config)} if share and config is not None else {}


def cache_of(model, out):
    """The KV cache a forward call returned (transformers' cache object)."""
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:  # e.g. FalconH1 under transformers 4.x, which only fills a cache it is given
        import transformers
        raise ConfigError(f"model: {type(unwrap(model)).__name__} returns no KV cache under transformers "
                          f"{transformers.__version__}, so it cannot be sampled here "
                          "(a newer transformers may)")
    return cache


def load_model(path, device, dtype="float32", attn_implementation="sdpa"):
    """(model, tokenizer) from a hub name or local path, weights in `dtype`. The policy trains in
    float32 (master weights, bf16 compute under autocast); bfloat16 is for frozen copies (the
    reference model) and inference. A tokenizer without a pad token pads with EOS, which is safe:
    masks count only the first EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()  # one progress bar is enough: ours
    problem = runs.damaged_weights(path) if os.path.isdir(path) else None
    if problem:
        raise ConfigError(f"model: {path}: {problem}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                     attn_implementation=attn_implementation).to(device)
    except (OSError, ValueError, KeyError) as err:  # not found, offline, unknown architecture, bad files
        raise ConfigError(f"model: {path}: {str(err).strip().splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model: {path}: the tokenizer has no EOS token, so completions could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def disable_dropout(model):
    """Zero every dropout probability, in modules and in attention (TRL's disable_dropout): the
    sampling and no-grad passes run in eval mode, so with dropout the update would score the
    completions under another policy than the one that drew them."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):  # transformers' attention reads a float while training
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


def add_lora(model, options, adapter=None):
    """LoRA adapters on `model`'s linear layers, in place (peft): the model's own forward then
    computes W x + (alpha / rank) B A x with W frozen and only A, B trainable, so the engine's
    sampling and log-prob paths need no change. options: LoraOptions (lora_target_modules:
    "all-linear", every linear layer but the output head, or comma-separated module names).
    adapter: a saved adapter folder to go on from (a resumed run). -> the PeftModel (for
    WithoutAdapters, saving and merged_weights)."""
    try:
        import peft
    except ImportError:
        raise ConfigError("lora_rank: LoRA needs the peft package (pip install peft)") from None
    names = options.lora_target_modules
    targets = names if names == "all-linear" else [t.strip() for t in names.split(",")]
    config = peft.LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha,
                             lora_dropout=options.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft reads an attribute that transformers 5 renamed
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        try:
            lora = (peft.PeftModel.from_pretrained(model, adapter, is_trainable=True) if adapter else
                    peft.get_peft_model(model, config))
        except ValueError as err:  # no module of that name
            raise ConfigError(f"lora_target_modules: {str(err).strip().splitlines()[0]}") from None
    if not any(p.requires_grad for p in model.parameters()):  # never a silent run that trains nothing
        raise ConfigError(f"lora_target_modules: {names!r} leaves no trainable parameter in the model")
    return lora


class WithoutAdapters(torch.nn.Module):
    """The frozen base under a LoRA policy, as a model of its own: the policy's forward with the
    adapters switched off. It is GRPO's reference model without a second copy of the weights."""

    def __init__(self, lora):
        super().__init__()
        self.module, self.lora = lora.get_base_model(), [lora]  # `module`: unwrap() finds the model

    def forward(self, **kwargs):
        with self.lora[0].disable_adapter():
            return self.module(**kwargs)


@torch.no_grad()
def merged_weights(model):
    """The base model's state dict under its own parameter names with every active adapter folded
    in, W + (alpha / rank) B A: what plain from_pretrained loads as the adapted model. model: a
    PeftModel, or the model peft put its adapters into (then the same as its state dict without
    them; a tied output head is named too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = {key.replace(".base_layer.", "."): value for key, value in base.state_dict().items()
             if ".lora_" not in key}
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            weight = module.base_layer.weight
            delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
            state[f"{name}.weight"] = weight + delta.to(weight.dtype)
    return state


def stop_ids(model, tokenizer):
    """Every token id that ends a completion: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return torch.tensor(sorted(ids), device=model.device)


def unwrap(model):
    """The transformers model inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


class Engine:
    """The policy's sampler and log-probs, for the models that share its tokenizer (the reference,
    the policy's training wrapper), built on grpo.py's definitions (`definition`, a Definition).
    bf16: forward passes under bf16 autocast (the weights stay as loaded). decoder: "static"
    samples with StaticDecoder where the model's family allows (compiled with compile_decode),
    "hf" with grpo.py's own sampler; "auto" is static where the family allows, except under FSDP,
    whose sharded layers only gather inside their forward. Under bf16 autocast over fp32 weights
    the static decoder samples a bf16 copy (Bf16Copy). open_policy sets the rest: vllm (a
    vllm_sampler.VllmSampler), tools (a tools.Toolbox) and share_prompt (a group's G sequences
    share one forward pass over their prompt)."""

    def __init__(self, model, tokenizer, definition, bf16=False, decoder="hf", compile_decode=False):
        self.model, self.tokenizer, self.definition, self.bf16 = model, tokenizer, definition, bf16
        self.eos_ids, self.pad_id = stop_ids(model, tokenizer), tokenizer.pad_token_id
        why_not = StaticDecoder.unsupported(model, 0)
        if decoder == "static" and why_not:
            raise ConfigError(f"decoder: static decoding cannot run this model: {why_not}")
        static = decoder in ("auto", "static")
        self.decoder = StaticDecoder(model, definition, compile_decode) if static and not why_not else None
        self.why_not_static, self.copy = why_not if static else f"decoder={decoder}", None
        self.vllm, self.tools, self.share_prompt = None, tools.Toolbox(tokenizer, self.eos_ids), True
        self.wants_copy = None  # whether the static decoder samples a Bf16Copy (static_decoder)

    def uses_static(self, length):
        """Whether sampling `length` tokens (prompt + completion) takes the static decoder: not under
        FSDP (its sharded layers gather their weights only inside their own forward), and not past
        a sliding window."""
        if self.decoder is None or any(hasattr(m, "reshard") for m in self.model.modules()):
            return False
        return StaticDecoder.unsupported(self.model, length) is None

    def autocast(self):
        return torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def sample(self, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0, top_p=1.0, uniforms=None):
        """Completions of the policy for left-padded prompts [B, P] -> Sampled, with its mask,
        lengths and info: one call of the sampler that runs, or with tools transcripts sampled in
        rounds with the tools' results between them (tools.py)."""
        how = Sampling(max_new_tokens, self.eos_ids, self.pad_id, temperature, top_p, uniforms,
                       self.share_prompt)
        how = how._replace(uniforms=draw_uniforms(prompt_ids, how) if uniforms is None else uniforms)
        nothing = torch.zeros((), dtype=torch.long, device=prompt_ids.device)
        try:
            out = Sampled(**self.tools.sample(self.sample_once, prompt_ids, prompt_mask, how))
        except RankFailed:
            raise
        except Exception:  # under torchrun the other ranks stop at their next check, with their own line
            sampling_check(nothing, failed=True)
            raise
        sampling_check(nothing)  # where a rank failed after its sampler's last check
        ended = completion_mask(out.tokens, self.eos_ids)
        return out._replace(mask=ended * out.mask, lengths=ended.sum(1))

    def sample_once(self, prompt_ids, prompt_mask, how):
        """One call of the sampler that runs (vLLM, the static decoder or grpo.sample), its
        uniforms drawn."""
        if self.vllm is not None:
            return Sampled(**self.vllm.sample(self.model, prompt_ids, prompt_mask, how))
        self.model.eval()
        with self.autocast():
            if self.uses_static(prompt_ids.size(1) + how.max_new_tokens):
                return self.static_decoder().sample(prompt_ids, prompt_mask, how)
            return self.definition.sample(self.model, prompt_ids, prompt_mask, how)

    def timings(self):
        """The sampler's own phases since the last call, for the metrics: t_weight_sync, the seconds
        spent pushing weights into vLLM (None without it)."""
        return {"t_weight_sync": self.vllm.take_sync_seconds() if self.vllm is not None else None}

    def static_decoder(self):
        """The static decoder, on a bf16 copy of the weights when they are fp32 under bf16 autocast
        (made at the first call, refreshed whenever the weights have moved since), so that each
        token reads 2 bytes per parameter rather than casting 4 to 2 again. LoRA's adapters and a
        bf16 frozen base need no copy."""
        if self.copy is None and self.bf16 and self.wants_copy is None:  # decided once, at the first call
            fp32 = any(p.dtype == torch.float32 for p in self.model.parameters())
            self.wants_copy = fp32 and not any(".lora_" in name for name, _ in self.model.named_parameters())
        if self.copy is None and self.wants_copy:
            self.copy = Bf16Copy(unwrap(self.model))
            self.decoder = StaticDecoder(self.copy.model, self.definition, self.decoder.compiled,
                                         self.decoder.bucket, self.decoder.backend)
        if self.copy is not None:
            self.copy.refresh()
        return self.decoder

    def logprobs(self, ids, attention, num_completion, model=None, share_prompt=None):
        """log-probs [B, C] of the last num_completion tokens of ids [B, L] under `model` (the
        policy when None) at temperature 1, with gradients where they are enabled; share_prompt:
        None is the engine's."""
        share = self.share_prompt if share_prompt is None else share_prompt
        with self.autocast():
            return self.definition.logprobs(self.model if model is None else model, ids, attention,
                                           num_completion, 1.0, share, False)[0]


class Bf16Copy:
    """A bf16 copy of a model's weights to sample with (2 bytes per parameter more memory), its
    modules the model's own (a deep copy whose parameters are bf16), refreshed in place with one
    foreach copy whenever the model's own weights may have changed (runs.WeightsMoved)."""

    def __init__(self, model):
        self.source, self.moved = list(model.parameters()), runs.WeightsMoved(model)
        memo = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
                for p in self.source}
        self.model = copy.deepcopy(model, memo).eval()
        self.copies = [memo[id(p)] for p in self.source]
        self.moved()  # the copy is of the weights as they are now

    @torch.no_grad()
    def refresh(self):
        if self.moved():
            torch._foreach_copy_(self.copies, self.source)


def open_reference(path, options, device, weights=None, lora=None):
    """The frozen reference model in options.dtype (bf16 halves its memory): RL's starting point at
    `path`, or with `weights` (a resumed run's synced copy) those; sharded as the policy is. With
    LoRA (`lora`: the policy with adapters) the base itself, adapters off (WithoutAdapters)."""
    if lora is not None:
        return WithoutAdapters(lora)
    model = load_model(path, device, options.dtype,
                       options.attn_implementation)[0].eval().requires_grad_(False)
    if weights is not None:
        model.load_state_dict(weights)
    return distribute(model, options, device, trainable=False)


def uses_bf16(options, device):
    """Whether forward passes run under bf16 autocast: options.bf16, or where None (auto) on CUDA
    and with dtype=bfloat16."""
    return (device.type == "cuda" or options.dtype == "bfloat16") if options.bf16 is None else options.bf16


def open_policy(path, options, device, dtype, definition):
    """The policy (weights in dtype) and its Engine on `definition` (grpo.py's, a Definition), as
    `options` (EngineOptions) ask: dropout off
    (disable_dropout), gradient checkpointing, bf16 autocast by default on CUDA and with
    dtype=bfloat16 on any device, the static decoder compiled on CUDA. Says which sampler runs."""
    if options.decoder == "vllm":
        import vllm_sampler
        vllm_sampler.check_model(path)
    model, tokenizer = load_model(path, device, dtype, options.attn_implementation)
    if options.disable_dropout:
        disable_dropout(model)
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bf16 = uses_bf16(options, device)
    compile_decode = device.type == "cuda" if options.compile_decode is None else options.compile_decode
    engine = Engine(model, tokenizer, definition, bf16, options.decoder, compile_decode)
    engine.tools = tools.open_toolbox(options, tokenizer, engine.eos_ids)
    engine.share_prompt = options.share_prompt
    if options.decoder == "vllm":
        engine.vllm = vllm_sampler.VllmSampler(path, model, options, bf16, merged_weights)
        vllm_sampler.started(engine.vllm)
        return model, engine
    graphs = " with CUDA graphs, which the first sampling says it captured" if device.type == "cuda" else ""
    say("sampling: " + (f"static KV cache{', compiled' + graphs if compile_decode else ''}" if engine.decoder
                        else f"transformers ({engine.why_not_static})"))
    return model, engine


# ----------------------------------------------------------------------------
# the fast path: a KV cache the engine owns, one decode step that picks its own token


FAST_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def rotate_half(x):
    first, second = x.chunk(2, -1)
    return torch.cat([-second, first], -1)


def batch_bucket(rows):
    """The batch a decode step runs at for `rows` rows: a power of two from 8 up to 64, then a
    multiple of 64, so that few shapes (each a CUDA graph) serve a run's batches."""
    return max(8, 1 << (rows - 1).bit_length()) if rows <= 64 else -(-rows // 64) * 64


class DecodeState(NamedTuple):
    """Every tensor a decode step reads and writes, allocated once per (batch, prompt width, new
    tokens) and reused by every call of that shape, at static addresses (CUDA graphs replay on
    them): each layer's keys and values [R, KV, W + T, D], which cache slots each row sees, the
    step's input token and position, the cache slot and output column it writes, the call's
    uniforms [R, T], temperature and top_p (0-d, so that a new value does not compile again), which
    rows have ended, the stop ids, and the outputs: tokens, log-probs and entropies [R, T]."""
    caches: list
    key_mask: torch.Tensor
    token: torch.Tensor
    position: torch.Tensor
    slot: torch.Tensor
    column: torch.Tensor
    uniforms: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor
    done: torch.Tensor
    eos_ids: torch.Tensor
    pad_id: torch.Tensor
    tokens: torch.Tensor
    logps: torch.Tensor
    entropies: torch.Tensor


class StaticDecoder:
    """Decoding with a KV cache the engine owns, for the Llama-shaped families (FAST_FAMILIES).
    Every row's keys and values live at the same cache slots (a left-padded prompt's pads are
    masked); a decode step embeds, attends (the query heads of each KV head folded into the query
    length, so that plain attention needs no grouped-query support), picks the next token from its
    uniform, records its log-prob and the entropy and updates which rows have ended, all on the
    device, in place on one DecodeState per shape, with no host sync: whether every row has ended
    is asked every 8 tokens. It reuses the Hugging Face model's modules (projections, norms, MLP,
    rotary), so it samples the weights it is given as they are now.
    compile: torch.compile the step (on CUDA "reduce-overhead", i.e. CUDA graphs) with the rows and
    lengths of its state marked dynamic and every other size static, so that batch and length
    buckets share one graph per way of picking (greedy, sampled, nucleus) and the graph's inputs
    are tensors on the device and sizes (no float of the model becomes a CPU scalar input); prompts
    are left-padded to a multiple of `bucket` tokens and batches to batch_bucket.
    A compile that fails says so in one line and the eager step goes on."""

    # shapes whose DecodeState is kept between calls, through the update too (each holds a KV cache
    # for its batch and length): the memory CUDA graphs cost, as a graph replays on those addresses
    MAX_STATES = 4

    def __init__(self, model, definition, compile=False, bucket=64, backend="inductor"):
        self.model, self.pick, self.picking = unwrap(model), definition.pick, definition.picking
        self.body, self.bucket, self.backend, self.states = self.model.model, bucket, backend, OrderedDict()
        self.step, self.compiled, self.reported = self.decode_step, compile, False
        self.warm = set()  # the ways of picking whose compiled step has run (compiling is said before)
        if compile:
            graphs = self.model.device.type == "cuda" and backend == "inductor"
            self.step = torch.compile(own_code(self.decode_step), backend=backend,
                                      fullgraph=True, mode="reduce-overhead" if graphs else None)

    @staticmethod
    def unsupported(model, length):
        """Why `model` cannot be decoded here for sequences of `length` tokens, or None."""
        config = unwrap(model).config
        if config.model_type not in FAST_FAMILIES:
            return f"{config.model_type} is not one of {', '.join(FAST_FAMILIES)}"
        window = getattr(config, "sliding_window", None)
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ["sliding_attention"])
        if window and sliding and getattr(config, "use_sliding_window", True) and window < length:
            return f"its sliding window ({window} tokens) is shorter than prompt + completion ({length})"
        return None

    def attend(self, q, k_cache, v_cache, mask, scale):
        """Attention of queries q [B, H, S, D] to the cache [B, KV, L, D] through mask [B, 1, S, L].
        One query (decoding): each KV head's G = H / KV query heads become G query positions,
        [B, KV, G, D], so that no K/V is copied per query head and no grouped-query kernel is
        needed. Several (the prompt): K/V repeated per query head."""
        B, H, S, D = q.shape
        groups = H // k_cache.size(1)
        if S == 1:
            out = torch.nn.functional.scaled_dot_product_attention(q.view(B, -1, groups, D), k_cache, v_cache,
                                                                   attn_mask=mask, scale=scale)
            return out.reshape(B, H, 1, D)
        keys, values = (cache.repeat_interleave(groups, 1) for cache in (k_cache, v_cache))
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)

    def forward(self, ids, positions, mask, caches, slots):
        """Logits [B, V] after the last of tokens ids [B, S] at positions [B, S], whose keys and
        values are written at cache `slots` [S]; mask [B, 1, S, L]: the cache slots each query sees."""
        B, S = ids.shape
        x = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(x, positions)
        cos, sin = cos[:, None], sin[:, None]
        for layer, (k_cache, v_cache) in zip(self.body.layers, caches):
            attention, h = layer.self_attn, layer.input_layernorm(x)
            q = attention.q_proj(h).view(B, S, -1, attention.head_dim)
            k = attention.k_proj(h).view(B, S, -1, attention.head_dim)
            if hasattr(attention, "q_norm"):  # Qwen3 normalises each head
                q, k = attention.q_norm(q), attention.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = attention.v_proj(h).view(B, S, -1, attention.head_dim).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
            v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
            # q to the cache's dtype, rather than the whole cache to q's
            out = self.attend(q.to(k_cache.dtype), k_cache, v_cache, mask, attention.scaling)
            x = x + attention.o_proj(out.to(x.dtype).transpose(1, 2).reshape(B, S, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(self.body.norm(x[:, -1]))

    def decode_step(self, s, mode):
        """One token for every row, in place on the DecodeState s: the logits after s.token at
        s.position, its keys and values stored at cache slot s.slot, the next token picked (mode:
        greedy, sample or nucleus) from the uniforms' column s.column and written there with its
        log-prob and entropy (pad after a row's end), then the ends and counters moved on."""
        slot = s.slot.view(1)
        s.key_mask.index_fill_(1, slot, True)
        logits = self.forward(s.token[:, None], s.position[:, None], s.key_mask[:, None, None, :], s.caches,
                              slot).float()
        uniform = s.uniforms.index_select(1, s.column.view(1)).squeeze(1)
        token, logp, entropy = self.pick(logits, s.temperature, s.top_p, uniform, mode)
        token = torch.where(s.done, s.pad_id, token)
        for out, value in ((s.tokens, token), (s.logps, logp), (s.entropies, entropy)):
            out.index_copy_(1, s.column.view(1), value[:, None].to(out.dtype))
        s.done.logical_or_(torch.isin(token, s.eos_ids))
        s.token.copy_(token)
        for counter in (s.position, s.slot, s.column):
            counter.add_(1)

    def state(self, rows, width, how, device):
        """The DecodeState of this shape: made (and its tensors marked as static addresses) once."""
        new_tokens = how.max_new_tokens
        key = (rows, width, new_tokens, len(how.eos_ids))
        if key in self.states:
            self.states.move_to_end(key)
        else:
            if len(self.states) == self.MAX_STATES:
                self.states.popitem(last=False)
            config, attention = self.model.config, self.body.layers[0].self_attn
            dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                     else self.model.dtype)
            shape = (rows, config.num_key_value_heads, width + new_tokens, attention.head_dim)

            def zeros(*size, dtype=torch.float32):
                return torch.zeros(size, dtype=dtype, device=device)
            caches = [(zeros(*shape, dtype=dtype), zeros(*shape, dtype=dtype)) for _ in self.body.layers]
            long, flag = torch.long, torch.bool
            state = DecodeState(
                caches, key_mask=zeros(rows, width + new_tokens, dtype=flag), token=zeros(rows, dtype=long),
                position=zeros(rows, dtype=long), slot=zeros(dtype=long), column=zeros(dtype=long),
                uniforms=zeros(rows, new_tokens), temperature=zeros(), top_p=zeros(),
                done=zeros(rows, dtype=flag), eos_ids=how.eos_ids.clone(), pad_id=zeros(dtype=long),
                tokens=zeros(rows, new_tokens, dtype=long), logps=zeros(rows, new_tokens),
                entropies=zeros(rows, new_tokens))
            for tensor in [*(t for pair in caches for t in pair), *state[1:]]:
                torch._dynamo.mark_static_address(tensor, guard=False)  # a new state re-records, no recompile
            # rows and lengths are the graph's only symbols: head_dim and the model's floats (eps, scales)
            # stay constants, so that no batch size equal to head_dim recompiles and no CPU scalar is an input
            dynamic = [*((t, [0, 2]) for pair in caches for t in pair), (state.key_mask, [0, 1]),
                       *((t, [0, 1]) for t in (state.uniforms, state.tokens, state.logps, state.entropies)),
                       *((t, 0) for t in (state.token, state.position, state.done))]
            for tensor, dims in dynamic:
                torch._dynamo.mark_dynamic(tensor, dims)
            self.states[key] = state
        return self.states[key]

    @torch.no_grad()
    def sample(self, prompt_ids, prompt_mask, how):
        """As grpo.sample (the same tokens for the same uniforms) -> Sampled."""
        try:
            return self.run(prompt_ids, prompt_mask, how)
        except (torch.OutOfMemoryError, RankFailed):  # not the compiler's: the eager step would fail too
            raise
        except Exception as err:  # compiling failed (a missing compiler, Triton, ...): the eager step goes on
            if self.step == self.decode_step:
                raise
            say(f"sampling: compiling the decode step failed ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); the eager step goes on")
            self.step, self.compiled = self.decode_step, False
            return self.run(prompt_ids, prompt_mask, how)

    def run(self, prompt_ids, prompt_mask, how):
        B, device, T = len(prompt_ids), prompt_ids.device, how.max_new_tokens
        uniforms = draw_uniforms(prompt_ids, how) if how.uniforms is None else how.uniforms
        bucket = self.bucket if self.compiled else 1
        width = -(-prompt_ids.size(1) // bucket) * bucket  # left-pad to the bucket
        prompt_ids = torch.nn.functional.pad(prompt_ids, (width - prompt_ids.size(1), 0), value=how.pad_id)
        prompt_mask = torch.nn.functional.pad(prompt_mask, (width - prompt_mask.size(1), 0))
        s = self.state(batch_bucket(B) if self.compiled else B, width, how, device)
        logits = self.prefill(s, prompt_ids, prompt_mask, how.share_prompt)
        token, logp, entropy = self.pick(logits, how.temperature, how.top_p, uniforms[:, 0])
        done = torch.isin(token, how.eos_ids)
        for out, value in ((s.tokens, token), (s.logps, logp), (s.entropies, entropy)):
            out[:B, 0] = value
        for tensor, value, rest in ((s.token, token, how.pad_id), (s.done, done, True),
                                    (s.position, positions_of(prompt_mask)[:, -1] + 1, 0)):
            tensor[:B], tensor[B:] = value, rest  # rows past B only fill the batch's bucket
        s.uniforms[:B], s.uniforms[B:] = uniforms, 0.0
        for tensor, value in ((s.slot, width), (s.column, 1), (s.temperature, how.temperature),
                              (s.top_p, how.top_p), (s.pad_id, how.pad_id)):
            tensor.fill_(value)
        s.eos_ids.copy_(how.eos_ids)
        mode, columns, graphs = self.picking(how.temperature, how.top_p), T, cuda_graphs_recorded(device)
        cold, started = self.compiled and mode not in self.warm, time.perf_counter()
        if cold:  # minutes without a line read as a hang
            say(f"sampling: compiling the decode step for {mode} decoding, once (on a GPU this can take "
                "minutes); a line follows when it has run")
        # what is not marked dynamic stays constant, whatever an earlier decoder saw: torch remembers
        # which floats and sizes changed by source line, and would make them inputs here too
        with torch._dynamo.config.patch(specialize_float=True, automatic_dynamic_shapes=False):
            for column in range(1, T):
                if column % 8 == 0 and every_rank_done(s.done):  # a wait for the device, so every 8 tokens
                    columns = column
                    break
                self.step(s, mode)
        if cold and self.compiled:
            self.warm.add(mode)
            say(f"sampling: the {mode} decode step compiled and sampled {columns} tokens in "
                f"{time.perf_counter() - started:.0f} s")
        if self.compiled and device.type == "cuda" and not self.reported:
            self.reported = True
            recorded = cuda_graphs_recorded(device) - graphs  # counted, not inferred from no skip
            say("sampling: the compiled step " + (f"recorded {recorded} CUDA graph(s), replayed from now on"
                                                  if recorded > 0 else "recorded no CUDA graph (torch's log "
                                                  "says why: TORCH_LOGS=perf_hints)"))
        return Sampled(*(out[:B, :columns].clone() for out in (s.tokens, s.logps, s.entropies)))

    def prefill(self, s, prompt_ids, prompt_mask, share):
        """Each distinct prompt of prompt_ids [B, W] run once, its keys and values copied into the
        rows of the state's caches that have it; which slots the rows see set -> last logits [B, V]."""
        B, width, device = *prompt_ids.shape, prompt_ids.device
        both = torch.cat([prompt_ids, prompt_mask], 1)
        distinct, rows = (torch.unique_consecutive(both, dim=0, return_inverse=True) if share
                          else (both, torch.arange(B, device=device)))
        ids, mask = distinct.split(width, 1)
        caches = [(torch.zeros_like(k[:len(ids), :, :width]), torch.zeros_like(v[:len(ids), :, :width]))
                  for k, v in s.caches]
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        pads_see_themselves = torch.eye(width, dtype=torch.bool, device=device)
        seen = (mask.bool()[:, None, :] & causal) | pads_see_themselves
        slots = torch.arange(width, device=device)
        logits = self.forward(ids, positions_of(mask), seen[:, None], caches, slots)
        for (k, v), (k_prompt, v_prompt) in zip(s.caches, caches):
            k[:B, :, :width], v[:B, :, :width] = k_prompt[rows], v_prompt[rows]
        s.key_mask.zero_()
        s.key_mask[:B, :width] = prompt_mask.bool()
        return logits.float()[rows]


def own_code(method):
    """The bound `method` over a copy of its code object. torch.compile keeps compiled graphs, and
    counts recompiles against its limit (8), per code object: with its own copy each decoder (a
    new model, a phase of r1.py) starts from none instead of adding to those of every other."""
    function = method.__func__
    twin = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    return types.MethodType(twin, method.__self__)


def cuda_graphs_recorded(device):
    """How many CUDA graphs torch.compile's reduce-overhead mode (inductor's cudagraph trees) has
    recorded on `device` in this process, counted node by node in its tree manager: 0 off CUDA or
    before any."""
    if device.type != "cuda":
        return 0
    from torch._inductor import cudagraph_trees
    manager = cudagraph_trees.get_manager(device.index or 0, create_if_none_exists=False)
    nodes = [node for roots in (getattr(manager, "roots", None) or {}).values() for node in roots]
    count = 0
    while nodes:
        node = nodes.pop()
        count += 1
        nodes.extend(child for children in node.children.values() for child in children)
    return count
