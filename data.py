"""Tasks for GRPO: prompt templates, the tasks, tokenising, and a policy's held-out score.

A task's examples are dicts with `question` (the text the template wraps) and `answer` (the
ground truth the rewards compare against); `solution` is a worked completion in the think/answer
format where the task has one (used only by the cold-start SFT), and countdown examples carry
`numbers` and `target`. Each task is one entry of TASKS (at the end of its section): how its
disjoint (train, test) lists are made, which reward judges an answer right, whether it reads a file.
"""
import dataclasses
import functools
import importlib.util
import json
import math
import os
import random
import re
from typing import Literal, Optional

import numpy as np
import torch

import distributed
import tools
from configurator import ConfigError, Path, encodable, unread
from rewards import REWARDS, format_reward, parse_reward_spec, safe_batch_reward, safe_reward

# DeepSeek-R1-Zero's template (R1 paper, Table 1); the model continues after "Assistant:".
R1_ZERO = ("A conversation between User and Assistant. The user asks a question, and the Assistant "
           "solves it. The assistant first thinks about the reasoning process in the mind and then "
           "provides the user with the answer. The reasoning process and answer are enclosed within "
           "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
           "process here </think> <answer> answer here </answer>. User: {question}. Assistant:")
# The same instruction as a system prompt, for the chat form.
R1_SYSTEM = R1_ZERO.split(" User:")[0]
TEMPLATES = ("r1zero", "plain", "chat")


class DataError(ConfigError):
    """A data problem the user must fix; the message names the file and line."""


def render_prompt(example, template, tokenizer=None, system_prompt=None, prefill=""):
    """The prompt text for `example`: r1zero (the R1-Zero template), plain (the question and a
    newline), or chat (the tokenizer's chat template; system_prompt None = R1's instruction,
    "" = no system message), then `prefill`, the start of the answer (R1: "<think>")."""
    question = example["question"]
    if template == "r1zero":
        return R1_ZERO.format(question=question) + prefill
    if template == "plain":
        return question + "\n" + prefill
    system = R1_SYSTEM if system_prompt is None else system_prompt
    messages = (([{"role": "system", "content": system}] if system else [])
                + [{"role": "user", "content": question}])
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill


# ----------------------------------------------------------------------------
# synthetic tasks (seeded, generated, train and test disjoint)

def addition_example(a, b):
    """`a+b` with a worked solution that adds column by column, right to left, with the carry:
    47+38 -> <think>7+8=15,4+3+1=8</think><answer>85</answer>."""
    steps, carry, da, db = [], 0, str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={x + y + carry}")
        carry = (x + y + carry) // 10
    solution = f"<think>{','.join(steps)}</think><answer>{a + b}</answer>"
    return {"question": f"{a}+{b}", "answer": str(a + b), "solution": solution}


def arithmetic_task(seed, n_test, digits=2):
    """All sums of two `digits`-digit numbers, shuffled by `seed`; the first n_test are the test set."""
    numbers = range(10 ** (digits - 1), 10 ** digits)
    pairs = [(a, b) for a in numbers for b in numbers]
    random.Random(seed).shuffle(pairs)
    examples = [addition_example(a, b) for a, b in pairs]
    return examples[n_test:], examples[:n_test]


TOOL_SHARE = 0.25  # products: the share of worked solutions that call the calculator (the cold start's)


def product_example(a, b, calls):
    """`a*b` with a worked solution that states the product, or (calls) first asks a calculator for
    it in tools.py's default tags: 47*38 -> <think>47*38</think><answer>1786</answer>, or
    <think><tool>47*38</tool><result>1786</result></think><answer>1786</answer>."""
    call, close, result, end = tools.ToolOptions.tool_tags
    work = f"{call}{a}*{b}{close}{result}{a * b}{end}" if calls else f"{a}*{b}"
    solution = f"<think>{work}</think><answer>{a * b}</answer>"
    return {"question": f"{a}*{b}", "answer": str(a * b), "solution": solution}


def products_task(seed, n_test, digits=2):
    """All products of two `digits`-digit numbers, shuffled by `seed`; the first n_test are the test
    set. A seeded TOOL_SHARE of the worked solutions call the calculator: a task to delegate."""
    numbers = range(10 ** (digits - 1), 10 ** digits)
    pairs = [(a, b) for a in numbers for b in numbers]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    examples = [product_example(a, b, rng.random() < TOOL_SHARE) for a, b in pairs]
    return examples[n_test:], examples[:n_test]


def countdown_example(rng):
    """Countdown (TinyZero): 3 or 4 numbers in 1..99 and a target in 1..999 that some expression
    using each number once with + - * / reaches (made by combining the numbers at random)."""
    while True:
        numbers = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        order = numbers[:]
        rng.shuffle(order)
        value = order[0]
        for n in order[1:]:
            options = [value + n, value - n, value * n] + ([value // n] if value % n == 0 else [])
            value = rng.choice(options)
        if 1 <= value <= 999:
            question = (f"Using the numbers {numbers}, create an equation that equals {value}. "
                        "You can use + - * / and each number exactly once.")
            return {"question": question, "answer": str(value), "numbers": numbers, "target": value}


def countdown_task(seed, n_train, n_test):
    rng, seen, examples = random.Random(seed), set(), []
    while len(examples) < n_train + n_test:
        example = countdown_example(rng)
        key = (tuple(sorted(example["numbers"])), example["target"])
        if key not in seen:
            seen.add(key)
            examples.append(example)
    return examples[n_test:], examples[:n_test]


# ----------------------------------------------------------------------------
# tasks from files

def read_jsonl(path):
    """Yield (line number, dict) for each non-blank line; a bad line (not UTF-8, not JSON, nested
    too deeply, a key twice, no object, text no tokenizer can take) raises DataError naming it."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: {'not a regular file' if os.path.exists(path) else 'no such file'}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=unique_keys)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            except (ValueError, RecursionError) as err:  # a key twice; too deep; a number too long
                raise DataError(f"{path}:{lineno}: "
                                f"{err if isinstance(err, ValueError) else 'nested too deeply'}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            bad = next((text for text in strings(row) if not encodable(text)), None)
            if bad is not None:  # valid JSON ("\ud800"), but no tokenizer or file can take it
                raise DataError(f"{path}:{lineno}: {bad[:40]!r} is not valid Unicode text (a lone surrogate)")
            yield lineno, row


def strings(value):
    """Every str inside a JSON value (its keys too), without recursion."""
    stack = [value]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def unique_keys(pairs):
    keys = [key for key, _ in pairs]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is not None:
        raise ValueError(f"key {twice!r} appears twice")
    return dict(pairs)


def require_text(row, key, path, lineno):
    if not isinstance(row.get(key), str) or not row[key].strip():
        raise DataError(f"{path}:{lineno}: missing or empty string field '{key}'")
    return row[key]


def gsm8k_example(row, path, lineno):
    """A GSM8K row: `answer` is the worked solution, with <<calculator>> notes, ending '#### N'."""
    question, answer = require_text(row, "question", path, lineno), require_text(row, "answer", path, lineno)
    reasoning, sep, final = answer.rpartition("####")
    if not sep or not final.strip():
        raise DataError(f"{path}:{lineno}: 'answer' does not end with '#### <number>'")
    final = final.strip().replace(",", "")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    return {"question": question, "answer": final, "source": f"{path}:{lineno}",
            "solution": f"<think>{reasoning}</think><answer>{final}</answer>"}


def jsonl_example(row, path, lineno):
    """A generic row {"prompt": ..., "answer": ...}; the answer is a non-empty string or a finite
    number (a list is written as a string: "1,2,3"); extra fields are kept for custom rewards."""
    example = dict(row, question=require_text(row, "prompt", path, lineno), source=f"{path}:{lineno}")
    answer = row.get("answer")
    if "answer" not in row:
        raise DataError(f"{path}:{lineno}: missing field 'answer'")
    number = type(answer) in (int, float) and math.isfinite(answer)
    if not (number or isinstance(answer, str) and answer.strip()):
        raise DataError(f"{path}:{lineno}: 'answer' must be a non-empty string or a finite number, "
                        f"not {json.dumps(answer)}")
    example["answer"] = str(answer)
    if "solution" in row:  # a worked completion for the cold start
        require_text(row, "solution", path, lineno)
    return example


def is_hub_dataset(name):
    """A name like "openai/gsm8k" that is no local file, with the optional `datasets` package installed."""
    import importlib.util
    return (not os.path.exists(name) and name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and importlib.util.find_spec("datasets") is not None)


def hub_rows(name, split):
    """(row number, dict) from a hub dataset through `datasets` (needs the network or its cache).
    GSM8K's hub copy needs the "main" config; `name:config` picks one."""
    import datasets
    name, _, config = name.partition(":")
    try:
        rows = datasets.load_dataset(name, config or ("main" if name == "openai/gsm8k" else None),
                                     split=split)
    except Exception as err:  # offline, no such dataset or split
        raise DataError(f"{name}: cannot load split {split!r} through datasets "
                        f"({str(err).splitlines()[0]})") from None
    return enumerate(rows, 1)


def load_file(path, make_example, split="train"):
    rows = hub_rows(path, split) if is_hub_dataset(path) else read_jsonl(path)
    examples = [make_example(dict(row), path, lineno) for lineno, row in rows]
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def file_task(make_example):
    """A task read from data_path (JSONL or a hub dataset): the test split is the first eval_size
    rows of eval_data_path, or of data_path when none is given (then held out from training)."""
    def load(seed, data_path, eval_data_path, eval_size, digits):
        train = load_file(data_path, make_example)
        if eval_data_path:
            return train, load_file(eval_data_path, make_example, split="test")[:eval_size]
        if len(train) <= eval_size:
            raise DataError(f"{data_path}: {len(train)} examples, "
                            f"not enough to hold out eval_size={eval_size}")
        return train[eval_size:], train[:eval_size]
    return load


def enumerated_split(make, name):
    """The split of a task that enumerates its questions, make(seed, n_test, digits)."""
    def load(seed, data_path, eval_data_path, eval_size, digits):
        train, test = make(seed, eval_size, digits)
        if not train:
            raise DataError(f"{name}: eval_size={eval_size} leaves no training question ({len(test)} in all)")
        return train, test
    return load


COUNTDOWN_TRAIN = 100_000  # countdown questions made to train on; as many at most held out


def countdown_split(seed, data_path, eval_data_path, eval_size, digits):
    return countdown_task(seed, COUNTDOWN_TRAIN, eval_size)


@dataclasses.dataclass(frozen=True)
class Task:
    load: object  # (seed, data_path, eval_data_path, eval_size, digits) -> (train, test) example lists
    correct: str  # the reward of rewards.REWARDS that judges an answer right (accuracy metric, r1.py sample)
    needs_file: bool = False  # reads data_path (and eval_data_path)


# every task: adding one is adding a line here (and a reward to rewards.REWARDS if it judges
# answers its own way)
TASKS = {
    "arithmetic": Task(enumerated_split(arithmetic_task, "arithmetic"), "accuracy"),
    "products": Task(enumerated_split(products_task, "products"), "accuracy"),  # for tools=calculator
    "countdown": Task(countdown_split, "countdown"),
    "gsm8k": Task(file_task(gsm8k_example), "accuracy", needs_file=True),
    "jsonl": Task(file_task(jsonl_example), "accuracy", needs_file=True),
}


def load_task(task, seed, data_path="", eval_data_path="", eval_size=200, digits=2):
    """(train, test) example lists of a task of TASKS; a test set that takes long to evaluate is said."""
    train, test = TASKS[task].load(seed, data_path, eval_data_path, eval_size, digits)
    if len(test) > LONG_EVALUATION:
        distributed.say(f"note: each evaluation samples all {len(test)} held-out questions "
                        f"(before and after RL, "
                 "and every eval_every steps): it takes long; eval_size sets how many")
    return train, test


LONG_EVALUATION = 10_000  # held-out questions beyond which evaluating is said to take long


@dataclasses.dataclass
class DataOptions:
    # the task and its prompts (data.py)
    task: Literal[tuple(TASKS)] = "arithmetic"  # data.TASKS; gsm8k and jsonl read data_path
    data_path: Path = ""           # training JSONL (or hub dataset) for gsm8k / jsonl
    eval_data_path: Path = ""      # held-out JSONL (its first eval_size rows); "" = data_path's first
    digits: int = 2                # arithmetic, products: digits per operand
    template: Literal[TEMPLATES] = "plain"  # prompt template (R1-Zero: r1zero)
    system_prompt: Optional[str] = None  # chat: the system message; None = R1's instruction, "" = none
    prefill: str = ""              # the answer's opening, after the prompt (R1: "<think>"); rewards see it
    max_prompt_tokens: int = 0     # longer prompts keep their last tokens; 0 = context - max_new_tokens
    prompt_overflow: Literal["truncate", "reject"] = "truncate"  # a longer prompt: cut (counted) | refused

    def checks(self):
        hub = "" if importlib.util.find_spec("datasets") else " (hub datasets need the `datasets` package)"
        files = [(key, getattr(self, key)) for key in ("data_path", "eval_data_path") if getattr(self, key)]
        reads_file = TASKS[self.task].needs_file
        return [(not reads_file or self.data_path, f"data_path: task {self.task} needs a JSONL file"),
                *unread(self, not reads_file, ("data_path", "eval_data_path"),
                        f"task={self.task} reads no file (task=jsonl or gsm8k does)"),
                *unread(self, self.task not in ("arithmetic", "products"), ("digits",),
                        f"task={self.task} has no operands"),
                *unread(self, self.template != "chat", ("system_prompt",),
                        f"template={self.template} has no system message (chat has)"),
                *[(os.path.isfile(path) or is_hub_dataset(path), f"{key}: {path}: no such file{hub}")
                  for key, path in files],
                (1 <= self.digits <= 3, "digits: from 1 to 3 (every pair of operands is enumerated)"),
                (self.task != "countdown" or self.eval_size <= COUNTDOWN_TRAIN,
                 f"eval_size: at most {COUNTDOWN_TRAIN} countdown questions held out (each is made, and "
                 f"evaluated, one by one: {self.eval_size} would take hours)"),
                (self.max_prompt_tokens >= 0, "max_prompt_tokens: must not be negative")]


# ----------------------------------------------------------------------------
# the order GRPO steps see the training questions in


def step_examples(examples, step, count, seed):
    """The questions of GRPO step `step`: the next `count` of a seeded permutation per epoch, so
    the data position is the step number itself and a resumed run sees the same questions."""
    picked = []
    for k in range(step * count, (step + 1) * count):
        epoch, offset = divmod(k, len(examples))
        picked.append(examples[epoch_order(seed, epoch, len(examples))[offset]])
    return picked


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, size):
    return np.random.default_rng([seed, epoch]).permutation(size)


# ----------------------------------------------------------------------------
# the demo's model


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def initial_model(cfg):
    """cfg.model's path; "tiny" is first built into the run directory (by the main rank)."""
    path = os.path.join(cfg.out_dir, "tiny") if cfg.model == "tiny" else cfg.model
    if cfg.model == "tiny" and distributed.main_rank():
        build_tiny_model(path, cfg.seed)
    distributed.barrier()
    return path


def build_tiny_model(path, seed, arch="llama", chat=False):
    """A ~1M-parameter Llama (or Qwen2) and a character-level tokenizer with the think/answer tags
    as single tokens, built from a config (no download) and saved with save_pretrained. With
    chat=True the tokenizer gets a Qwen-style chat template, <|im_end|> as its EOS, and the model
    stops at <|im_end|> or <|endoftext|>, like Qwen's instruct models."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                              Qwen2ForCausalLM)
    from transformers.utils import logging
    logging.disable_progress_bar()  # save_pretrained's bar would cut into the run's own lines
    specials = ["<pad>", "<eos>", "<unk>"] + (["<|im_start|>", "<|im_end|>", "<|endoftext|>"] if chat else [])
    tags = ["<think>", "</think>", "<answer>", "</answer>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + tags + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    eos = "<|im_end|>" if chat else "<eos>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token=eos,
                                        unk_token="<unk>",
                                        additional_special_tokens=specials[3:] if chat else None)
    tokenizer.add_tokens(tags)  # matched whole, before the character split
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    shape = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
                 bos_token_id=None, eos_token_id=[vocab[eos], vocab["<|endoftext|>"]] if chat else vocab[eos])
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        if arch == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **shape))
        else:
            model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, **shape))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------
# prompts and completions as token ids


def prompt_token_ids(tokenizer, examples, cfg):
    """Token ids of each example's rendered prompt. Special tokens (e.g. BOS) are added except for
    chat, whose template already has them."""
    texts = [render_prompt(e, cfg.template, tokenizer, cfg.system_prompt, cfg.prefill) for e in examples]
    return tokenizer(texts, add_special_tokens=cfg.template != "chat")["input_ids"]


def encode_prompts(tokenizer, examples, cfg, device):
    """Prompt ids cut to their last cfg.max_prompt_tokens (`prompt_overflow` was checked at start)
    and left-padded -> ids [B, P], mask [B, P], number of prompts cut."""
    rows = prompt_token_ids(tokenizer, examples, cfg)
    limit = cfg.max_prompt_tokens
    cut = sum(len(row) > limit for row in rows)
    rows = [row[-limit:] for row in rows]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask, cut


def encode_completions(tokenizer, completions, device):
    """Texts -> [B, T] ids, each ending in EOS, right-padded with pad_id."""
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for text in completions]
    width = max(map(len, rows))
    return torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows], device=device)


def judged_prefill(prefill):
    """The part of a prefill that belongs to the answer: from its first <think> or <answer> tag on.
    Text before the tag (TinyZero's " Let me solve this step by step.\n<think>") is prompt the
    model did not write and lies outside the structure the template asks for; a prefill without a
    tag is all prompt."""
    starts = [prefill.find(tag) for tag in ("<think>", "<answer>") if tag in prefill]
    return prefill[min(starts):] if starts else ""


def decode(tokenizer, completion_ids, prefill=""):
    """Completion texts as the rewards see them: the answer's part of the prefill (judged_prefill),
    then the sampled tokens up to EOS."""
    opening = judged_prefill(prefill)
    return [opening + text for text in tokenizer.batch_decode(completion_ids, skip_special_tokens=True)]


def resolve_prompt_limit(cfg, model, tokenizer, examples):
    """cfg with max_prompt_tokens fitted to the model's context (max_position_embeddings) minus
    max_new_tokens. With prompt_overflow=reject, a longer prompt among `examples` stops the run."""
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    room = context - cfg.max_new_tokens
    if room < 1:
        raise ConfigError(f"max_new_tokens: {cfg.max_new_tokens} leaves no room for a prompt in the model's "
                          f"context of {context} tokens")
    cfg = dataclasses.replace(cfg, max_prompt_tokens=min(cfg.max_prompt_tokens or room, room))
    try:  # a first prompt, before the run directory changes: a chat template may be missing or refuse
        prompt_token_ids(tokenizer, examples[:1], cfg)
    except Exception as err:
        raise ConfigError(f"template: {cfg.template} cannot render a prompt with this tokenizer "
                          f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})")
    if cfg.prompt_overflow == "reject":  # measured exactly as encode_prompts will cut them
        for i, ids in enumerate(prompt_token_ids(tokenizer, examples, cfg)):
            if len(ids) > cfg.max_prompt_tokens:
                raise ConfigError(f"prompt_overflow: {examples[i].get('source', f'example {i}')}: "
                                  f"a prompt of {len(ids)} "
                                  f"tokens, over max_prompt_tokens={cfg.max_prompt_tokens}; "
                                  "prompt_overflow=truncate cuts such prompts")
    return cfg


# ----------------------------------------------------------------------------
# how a policy does on a task's held-out questions


@dataclasses.dataclass
class EvalOptions:
    # evaluation (data.py)
    eval_size: int = 200           # held-out questions for greedy accuracy before and after RL
    eval_every: int = 0            # steps between evaluations during RL; 0 = before and after only
    eval_batch_size: int = 200     # questions per sampling batch
    eval_k: int = 0                # sampled pass@k: k samples per question at `temperature`; 0 = greedy only

    def checks(self):
        counts = ("eval_size", "eval_every", "eval_k")
        return [*[(getattr(self, k) >= 0, f"{k}: must not be negative") for k in counts],
                (self.eval_batch_size >= 1, "eval_batch_size: must be at least 1"),
                *unread(self, not self.eval_size, ("eval_every", "eval_batch_size", "eval_k"),
                        "no evaluation runs (eval_size=0)")]


def correctness(task):
    """The reward that judges an answer right under `task` (TASKS): the `accuracy` metric."""
    return REWARDS[TASKS[task].correct]


@torch.no_grad()
def evaluate(engine, examples, cfg):
    """Held-out metrics of the policy (engine.Engine): greedy pass@1 `accuracy`, `format`
    compliance, the share of completions that write a tool call (`tool_call_frac`, with tools or
    without) and mean completion `length` (tokens); with eval_k > 0 also `pass_at_k` (some of k
    samples at `temperature` is correct) and `sampled_accuracy` (the mean over those samples); with
    a reward model among cfg.rewards, its mean score `reward_rm:PATH` of the greedy completions."""
    correct, k, T = correctness(cfg.task), cfg.eval_k, cfg.max_new_tokens
    learned = [name for name, _ in parse_reward_spec(cfg.rewards) if getattr(REWARDS[name], "batched", False)]
    names = ["accuracy", "format", "tool_call_frac", "length"] + [f"reward_{name}" for name in learned]
    names += ["pass_at_k", "sampled_accuracy"] if k else []
    # the same number of batches on every rank; repeats do not count
    shard, counted = distributed.padded_share(examples)
    totals = torch.zeros(len(names))
    for start in range(0, len(shard), cfg.eval_batch_size):
        chunk = shard[start:start + cfg.eval_batch_size]
        ids, mask, _ = encode_prompts(engine.tokenizer, chunk, cfg, engine.model.device)
        out = engine.sample(ids, mask, T, temperature=0)
        texts = decode(engine.tokenizer, out.tokens, cfg.prefill)
        row = [[safe_reward(correct, t, e)[0], format_reward(t, e), tools.calls_in(t, cfg.tool_tags) > 0]
               for t, e in zip(texts, chunk)]
        row = torch.cat([torch.tensor(row), out.lengths[:, None].cpu()], 1)
        for name in learned:  # a reward model's score beside the rule's accuracy: reward hacking shows
            row = torch.cat([row, safe_batch_reward(REWARDS[name], texts, chunk, ids.device)[0][:, None]], 1)
        if k:
            drawn = torch.rand(distributed.world_size() * len(chunk) * k, T)  # one stream for every rank
            uniforms = distributed.my_share(drawn).to(ids.device)
            out = engine.sample(ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), T, cfg.temperature,
                                cfg.top_p, uniforms).tokens
            texts = decode(engine.tokenizer, out, cfg.prefill)
            hits = torch.tensor([safe_reward(correct, t, chunk[i // k])[0]
                                 for i, t in enumerate(texts)]).view(-1, k)
            row = torch.cat([row, (hits.max(1).values > 0).float()[:, None], hits.mean(1, keepdim=True)], 1)
        totals += row[:max(0, counted - start)].sum(0)
    return dict(zip(names, (distributed.all_sum(totals) / max(1, len(examples))).tolist()))
