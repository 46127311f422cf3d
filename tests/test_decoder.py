"""The static decoder as CUDA graphs need it, proved on the CPU: the compiled step is one graph
per way of picking (no break, no recompile for a new batch or prompt length), every tensor it
writes lives at one address for the whole run, a step's outputs survive the next, nothing waits
for the device between the every-8-tokens checks, the sampled tokens are transformers' (fp32) or
close to them (bf16), a bf16 copy of fp32 weights follows every update, and a compile that fails
falls back to the eager step in one line."""
import copy
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine
import grpo
from conftest import left_padded
from test_families import build

FAST = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny[1]


def prompts(tokenizer, questions, group=1):
    """Left-padded prompt ids and mask of `questions`, each repeated `group` times."""
    return left_padded(tokenizer, [q + "\n" for q in questions for _ in range(group)])


def how(tokenizer, rows, new_tokens=12, temperature=1.0, top_p=1.0, seed=0):
    uniforms = torch.rand(rows, new_tokens, generator=torch.Generator().manual_seed(seed))
    eos = torch.tensor([tokenizer.eos_token_id])
    return engine.Sampling(new_tokens, eos, tokenizer.pad_token_id, temperature, top_p, uniforms)


def counting_backend(compiled):
    """A torch.compile backend that runs the traced graph as it is and counts each compilation."""
    def backend(graph, example_inputs):
        compiled.append(graph)
        return graph.forward
    return backend


def test_batch_buckets_by_hand():
    assert [engine.batch_bucket(n) for n in (1, 8, 9, 16, 33, 64, 65, 128, 200, 256, 257)] == \
        [8, 8, 16, 16, 64, 64, 128, 128, 256, 256, 320]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_the_compiled_step_is_one_graph_with_the_eager_steps_tokens(name, temperature, top_p, tokenizer):
    """fullgraph=True: a graph break would raise. The traced graph gives the eager step's tokens."""
    model = build(name, tokenizer)
    ids, mask = prompts(tokenizer, ["12+34", "5+6", "99+1"], group=2)
    settings = how(tokenizer, len(ids), temperature=temperature, top_p=top_p)
    compiled = []
    traced = engine.StaticDecoder(model, grpo.DEFINITION, compile=True, bucket=16,
                                     backend=counting_backend(compiled))
    eager = engine.StaticDecoder(model, grpo.DEFINITION).sample(ids, mask, settings)
    out = traced.sample(ids, mask, settings)
    assert len(compiled) == 1 and torch.equal(out.tokens, eager.tokens)
    assert torch.allclose(out.logp, eager.logp, atol=1e-5)


def test_the_compiled_steps_inputs_are_weights_state_and_sizes(tiny, tokenizer):
    """What CUDA graphs need of the compiled step, proved on CPU with a backend that records the graph:
    every input is a weight of the model, a tensor of the decode state (static addresses) or a size;
    none is a CPU scalar made from a float the model holds (RMSNorm's eps, attention's scaling), which
    dynamic=True made of them. And a first batch equal to head_dim (32 here; duck sizing would tie the
    two) compiles the one graph that every later batch and length reuses."""
    model = tiny[0]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    inputs, known = [], {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def recording(graph, example_inputs):
        inputs.append(example_inputs)
        for state in decoder.states.values():  # the state being decoded, when the graph is traced
            known.update(t.data_ptr() for t in [*(c for pair in state.caches for c in pair), *state[1:]])
        return graph.forward
    decoder = engine.StaticDecoder(model, grpo.DEFINITION, compile=True, bucket=16, backend=recording)
    for rows, question in ((head_dim, "1+2"), (16, "12+34+56+78+9"), (64, "1+2"), (8, "3+4"), (128, "5+6")):
        ids, mask = prompts(tokenizer, [question], rows)
        decoder.sample(ids, mask, how(tokenizer, rows, new_tokens=10))
    assert len(inputs) == 1
    tensors = [x for x in inputs[0] if isinstance(x, torch.Tensor)]
    assert all(isinstance(x, (torch.SymInt, int)) for x in inputs[0] if not isinstance(x, torch.Tensor))
    assert not [x for x in tensors if x.dtype == torch.float64]
    assert all(x.data_ptr() in known for x in tensors)


def test_each_first_compile_is_said_before_and_after(tiny, tokenizer, capsys):
    """No silent minutes: before the first call of each way of picking, a line says the step is
    compiling; after it, how long the call took; a warm step says nothing."""
    decoder = engine.StaticDecoder(tiny[0], grpo.DEFINITION, compile=True, bucket=16,
                                   backend=counting_backend([]))
    ids, mask = prompts(tokenizer, ["1+2", "3+4"], 2)
    said = []
    for temperature in (1.0, 1.0, 0.0):
        decoder.sample(ids, mask, how(tokenizer, len(ids), temperature=temperature))
        said.append(capsys.readouterr().out.splitlines())
    assert said[0][0] == ("sampling: compiling the decode step for sample decoding, once (on a GPU this can "
                          "take minutes); a line follows when it has run")
    assert re.fullmatch(r"sampling: the sample decode step compiled and sampled \d+ tokens in \d+ s",
                        said[0][1])
    assert said[1] == []
    assert said[2][0].startswith("sampling: compiling the decode step for greedy decoding")


@pytest.mark.slow
def test_a_gsm8k_shaped_run_compiles_one_graph_per_way_of_picking(tokenizer, tiny_dir):
    """Training batches of mixed prompt lengths (within and across 16-token buckets), evaluation
    batches with a partial last one, greedy, sampled and nucleus, with LoRA's adapters on: three
    graphs, far below torch's recompile limit, so no call falls back to running uncompiled."""
    pytest.importorskip("peft")
    model = engine.load_model(tiny_dir, "cpu")[0]
    engine.add_lora(model, engine.LoraOptions(4, 8.0))
    compiled = []
    decoder = engine.StaticDecoder(model, grpo.DEFINITION, compile=True, bucket=16,
                                     backend=counting_backend(compiled))
    short, mid, long = ["1+2", "3+4"], ["12+34+56", "7+8"], ["+".join(["12345"] * 4), "9+9"]
    batches = [(short, 8, 1.0, 1.0), (mid, 8, 1.0, 1.0), (long, 8, 1.0, 1.0), (short * 25, 1, 0.0, 1.0),
               (mid * 9, 1, 0.0, 1.0), (long * 3, 1, 0.0, 1.0), (short, 8, 1.0, 0.9), (mid, 8, 1.0, 1.0)]
    for questions, group, temperature, top_p in batches:
        ids, mask = prompts(tokenizer, questions, group)
        decoder.sample(ids, mask, how(tokenizer, len(ids), temperature=temperature, top_p=top_p))
    assert len(compiled) == 3 < torch._dynamo.config.recompile_limit
    assert {key[:2] for key in decoder.states} <= {(16, 16), (16, 32), (64, 16), (32, 16), (8, 32)} | {
        (r, w) for r in (8, 16, 32, 64) for w in (16, 32, 48)}


class Writes(TorchDispatchMode):
    """The storages that in-place ops write, op by op."""

    def __init__(self):
        super().__init__()
        self.written = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for argument, value in zip(func._schema.arguments, [*args, *kwargs.values()]):
            written = argument.alias_info is not None and argument.alias_info.is_write
            if written and isinstance(value, torch.Tensor):
                self.written.append(value.untyped_storage().data_ptr())
        return func(*args, **kwargs)


def test_every_tensor_the_step_writes_keeps_its_address_across_steps_and_calls(tokenizer):
    model = build("qwen2", tokenizer)
    decoder = engine.StaticDecoder(model, grpo.DEFINITION, compile=False)
    decoder.compiled = True  # buckets as when compiled, the eager step recorded
    real, writes = decoder.step, []

    def recorded(s, mode):
        with Writes() as seen:
            real(s, mode)
        writes.append(set(seen.written))
    decoder.step = recorded
    ids, mask = prompts(tokenizer, ["12+34", "5+6"], group=3)
    decoder.sample(ids, mask, how(tokenizer, len(ids)))
    (state,) = decoder.states.values()
    tensors = [*(t for pair in state.caches for t in pair), *state[1:]]
    static = {t.untyped_storage().data_ptr() for t in tensors}
    assert all(t._dynamo_static_input_type for pair in state.caches for t in pair)
    ids2, mask2 = prompts(tokenizer, ["1+1", "40+2"], group=3)  # another call, the same bucket
    decoder.sample(ids2, mask2, how(tokenizer, len(ids2), seed=1))
    assert len(decoder.states) == 1 and len(writes) == 2 * 11
    assert all(step == writes[0] for step in writes) and writes[0] <= static


def test_a_steps_outputs_are_not_overwritten_by_the_next(tokenizer):
    model = build("llama", tokenizer)
    decoder = engine.StaticDecoder(model, grpo.DEFINITION)
    real, columns = decoder.step, []

    def recorded(s, mode):
        real(s, mode)
        column = int(s.column) - 1
        columns.append((column, s.tokens[:, column].clone(), s.logps[:, column].clone()))
    decoder.step = recorded
    ids, mask = prompts(tokenizer, ["12+34", "5+6"], group=2)
    first = decoder.sample(ids, mask, how(tokenizer, len(ids)))
    for column, tokens, logp in columns:
        assert torch.equal(first.tokens[:, column], tokens[:len(ids)]) and torch.equal(first.logp[:, column],
                                                                                   logp[:len(ids)])
    kept = first.tokens.clone()
    decoder.sample(ids, mask, how(tokenizer, len(ids), seed=5))   # the next call reuses the buffers
    assert torch.equal(first.tokens, kept)                         # what a call returned is its own


def test_nothing_waits_for_the_device_between_the_checks(tokenizer, monkeypatch):
    """A host read (.item(), bool(), a tensor built from Python numbers) inside the decode loop
    would stall CUDA graphs; the loop's only one is the all-rows-ended check, every 8 tokens."""
    model = build("mistral", tokenizer)
    decoder = engine.StaticDecoder(model, grpo.DEFINITION)
    ids, mask = prompts(tokenizer, ["12+34", "5+6"], group=2)
    settings = how(tokenizer, len(ids), new_tokens=30)._replace(eos_ids=torch.tensor([len(tokenizer) + 7]))
    reads, checks = [], []
    real_done = engine.every_rank_done

    def done(flags):
        checks.append(1)
        return real_done(flags)
    monkeypatch.setattr(engine, "every_rank_done", done)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k:
                            reads.append(_n) or _o(self, *a, **k))
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: reads.append("torch.tensor") or real_tensor(*a, **k))
    out = decoder.sample(ids, mask, settings)
    assert out.tokens.shape[1] == 30 and len(checks) == 3          # tokens 8, 16, 24: no row ends
    assert reads == ["item"] * 3, reads


@pytest.mark.parametrize("name", FAST)
def test_bf16_sampling_is_near_transformers_bf16(name, tokenizer):
    """Under bf16 the static cache keeps bf16 keys where transformers keeps its own dtype, so the
    tokens are close rather than equal: greedy tokens mostly agree and the sampler's log-probs of
    its own tokens are within bf16 rounding of a full bf16 pass."""
    model = build(name, tokenizer)
    ids, mask = prompts(tokenizer, ["12+34", "5+6", "99+1", "7+8"], group=2)
    settings = how(tokenizer, len(ids), new_tokens=16, temperature=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        static = engine.StaticDecoder(model, grpo.DEFINITION).sample(ids, mask, settings)
        theirs = grpo.sample(model, ids, mask, settings).tokens
        full = torch.cat([ids, static.tokens], 1)
        attention = torch.cat([mask, torch.ones_like(static.tokens)], 1)
        logp, _ = grpo.completion_logprobs(model, full, attention, static.tokens.size(1),
                                             with_entropy=False)
    columns = min(static.tokens.size(1), theirs.size(1))
    assert (static.tokens[:, :columns] == theirs[:, :columns]).float().mean() > 0.8
    assert (static.logp - logp).abs().mean() < 0.05


@pytest.mark.parametrize("step", ["sgd", "fused_adamw"])  # a fused step leaves the version counters
def test_a_bf16_copy_of_fp32_weights_follows_every_update(tiny, step):
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    sampler = engine.Engine(model, tokenizer, grpo.DEFINITION, bf16=True, decoder="static")
    ids, mask = prompts(tokenizer, ["12+34", "5+6"], group=2)
    before = sampler.sample(ids, mask, 12, 1.0, 1.0, how(tokenizer, len(ids)).uniforms)
    assert sampler.copy is not None and sampler.decoder.model is sampler.copy.model
    assert all(c.dtype == torch.bfloat16 for c in sampler.copy.copies)
    refreshes = []
    real = torch._foreach_copy_
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "_foreach_copy_", lambda *a: refreshes.append(1) or real(*a))
        sampler.sample(ids, mask, 12, 1.0, 1.0, how(tokenizer, len(ids)).uniforms)  # unchanged: no copy
        assert refreshes == []
        optimizer = (torch.optim.SGD(model.parameters(), lr=0.5) if step == "sgd" else
                     torch.optim.AdamW(model.parameters(), lr=0.05, fused=True))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            attention = torch.cat([mask, torch.ones_like(before.tokens)], 1)
            logp = sampler.logprobs(torch.cat([ids, before.tokens], 1), attention, before.tokens.size(1))
        (-logp.sum()).backward()
        optimizer.step()
        after = sampler.sample(ids, mask, 12, 1.0, 1.0, how(tokenizer, len(ids)).uniforms)
        assert refreshes == [1]
    pairs = zip(sampler.copy.copies, model.parameters())
    assert all(torch.equal(c, p.detach().to(torch.bfloat16)) for c, p in pairs)
    assert not torch.equal(after.tokens, before.tokens)


def test_no_copy_for_fp32_sampling_or_lora(tiny, tiny_dir):
    ids, mask = prompts(tiny[1], ["1+2"], group=2)
    fp32 = engine.Engine(copy.deepcopy(tiny[0]), tiny[1], grpo.DEFINITION, bf16=False, decoder="static")
    fp32.sample(ids, mask, 4)
    assert fp32.copy is None
    if engine.runs.installed("peft"):
        model = engine.load_model(tiny_dir, "cpu")[0]
        engine.add_lora(model, engine.LoraOptions(4, 8.0))
        lora = engine.Engine(model, tiny[1], grpo.DEFINITION, bf16=True, decoder="static")
        lora.sample(ids, mask, 4)
        assert lora.copy is None


@pytest.mark.slow
def test_a_compile_that_fails_falls_back_to_the_eager_step_in_one_line(tmp_path, monkeypatch, capsys):
    def broken(fn, **options):
        def failing(*args, **kwargs):
            raise RuntimeError("Triton could not build its kernels\nmore detail")
        return failing
    monkeypatch.setattr(torch, "compile", broken)
    from test_train import FAST as ARGS
    grpo.train(grpo.parse_config(ARGS + ["--max_steps=2", "--compile_decode=True", f"--out_dir={tmp_path}"]))
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "compiling the decode step failed" in line] == [
        "sampling: compiling the decode step failed (RuntimeError: Triton could not build its kernels); "
        "the eager step goes on"]


@pytest.mark.slow
def test_each_decoder_compiles_on_its_own_below_the_recompile_limit(tokenizer):
    """torch.compile counts recompiles per code object; each decoder compiles a copy of the step's,
    so a process that makes many (r1.py's phases, these tests) never reaches the limit."""
    model = build("llama", tokenizer)
    ids, mask = prompts(tokenizer, ["12+34"], group=2)
    compiled = []
    for _ in range(torch._dynamo.config.recompile_limit + 1):
        decoder = engine.StaticDecoder(model, grpo.DEFINITION, compile=True, bucket=16,
                                     backend=counting_backend(compiled))
        decoder.sample(ids, mask, how(tokenizer, len(ids), temperature=0.0))
    assert len(compiled) == torch._dynamo.config.recompile_limit + 1


def test_cuda_graphs_are_counted_in_torchs_tree_manager(monkeypatch):
    """The "recorded CUDA graphs" line counts the nodes of inductor's cudagraph trees (a positive
    check), here on a stand-in tree: two roots, one with two children and a grandchild."""
    from types import SimpleNamespace

    from torch._inductor import cudagraph_trees

    def node(*children):
        return SimpleNamespace(children={"f": list(children)} if children else {})
    manager = SimpleNamespace(roots={"step": [node(node(), node(node()))], "other": [node()]})
    asked = []
    monkeypatch.setattr(cudagraph_trees, "get_manager",
                        lambda index, create_if_none_exists: asked.append((index, create_if_none_exists))
                        or manager)
    assert engine.cuda_graphs_recorded(torch.device("cuda", 1)) == 5
    assert asked == [(1, False)]  # looked at, never made
    manager.roots = None  # torch resets it when every graph's function has died
    assert engine.cuda_graphs_recorded(torch.device("cuda", 0)) == 0
    assert engine.cuda_graphs_recorded(torch.device("cpu")) == 0
