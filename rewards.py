"""Rule-based rewards for GRPO: small pure functions `(completion, example) -> float`.

`completion` is the model's text after the prompt, untrusted: nothing here ever passes it to
eval/exec, and every function is bounded in time by the length caps below. `example` is the task's
dict (`question`, `answer`, and for countdown `numbers` + `target`); the trainer adds
`completion_tokens`, `max_new_tokens`, `overlong_buffer` and `language` to it.

REWARDS maps the names used in the config (`rewards="accuracy:1,format:0.5"`) to the functions;
`score` applies them to a step's completions, each call guarded (`safe_reward`). A reward learned
from preferences, `rm:PATH` (reward_model.py), scores a step's completions in one batched call.
"""
import ast
import copy
import functools
import importlib.util
import math
import numbers
import os
import re
import signal
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

import torch

from configurator import unread
from usercode import load_function

MAX_TEXT = 20_000        # characters of a completion a reward will look at
MAX_EXPRESSION = 200     # characters of a countdown expression
MAX_MAGNITUDE = 10**12   # countdown intermediate values beyond this are rejected


@dataclass
class RewardOptions:
    # what the rewards read besides the completion (rewards.py)
    overlong_buffer: int = 0       # L_cache of the overlong reward (DAPO: 4096 of 20480 tokens)
    language: str = "en"           # target script of the language reward (R1: the prompt's language)

    def checks(self):  # and the spec of the core's `rewards`: its files load and its functions fit
        try:
            spec = parse_reward_spec(self.rewards) and ""
        except ValueError as err:
            spec = f"rewards: {err}"
        names = {part.split(":")[0].strip() for part in self.rewards.split(",")}
        shared = "overlong" in names or any(REWARDS.get(name) not in BUILTIN for name in names - {"", "rm"})
        return [(self.overlong_buffer >= 0, "overlong_buffer: must not be negative"),
                *unread(self, not shared, ("overlong_buffer",),
                        "no reward reads it (overlong, or one of yours)"),
                (self.language in SCRIPTS, f"language: {self.language!r} is not one of {', '.join(SCRIPTS)}"),
                (not spec, spec)]


THINK_ANSWER = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
TAG = re.compile(r"</?(think|answer)>")
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# a number as written: sign, currency, thousands commas, decimals, a mixed number ("1 1/2") or a
# fraction, percent; the commas also take in a list ("1,2,3"), which parse_answer tells apart
NUMBER = re.compile(r"[-−]?\$?\d[\d,]*(?:\.\d+)?(?:\s+\d+/\d+(?![\d/])|\s*/\s*\d+(?:\.\d+)?)?%?"
                    r"|[-−]?\.\d+%?")
MAX_ANSWER = 200         # characters of a final answer the checkers read
# a reward beyond ±MAX_REWARD is a failed call: rewards, their sums and variances stay finite in float32
MAX_REWARD = 1e6


# ----------------------------------------------------------------------------
# answers: find the final answer in a completion, then decide whether it equals the truth.
# math-verify (an optional package) decides when it is installed; the built-in parser otherwise.
# Both read the same cleaned text and agree on GSM8K and on the forms in tests/test_rewards.py.

def last_boxed(text):
    """The contents of the last complete \\boxed{…} in text (braces may nest), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth = 0
        for end in range(start + 6, min(len(text), start + 7 + MAX_ANSWER)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[start + 7:end]
        start = text.rfind("\\boxed{", 0, start)
    return None


def extract_answer(completion):
    """The final answer as written: the last <answer>…</answer> (its \\boxed{} if it holds one),
    else the last \\boxed{…}, else the last number in the text; None when there is none."""
    text = completion[:MAX_TEXT]
    answers = ANSWER.findall(text)
    if answers:
        answer = answers[-1].rpartition("<answer>")[2]  # "<answer></think><answer>90": the last one opened
        boxed = last_boxed(answer)
        return answer if boxed is None else boxed
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def clean_answer(text):
    """An answer reduced to its mathematics, for either checker: LaTeX text and spacing commands,
    currency and math delimiters dropped, the right side of the last `=`, words (units, "the
    answer is") removed; single letters and LaTeX commands (\\frac, \\pi) stay."""
    s = text[:MAX_ANSWER]
    boxed = last_boxed(s)
    s = boxed if boxed is not None else s
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|operatorname)\{([^{}]*)\}", r" \1 ", s)
    for old, new in (("\\$", ""), ("$", ""), ("\\%", "%"), ("{,}", ","), ("−", "-"), ("\\left", ""),
                     ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\!", ""), ("\\,", " "),
                     ("\\;", " "), ("\\ ", " "), ("~", " ")):
        s = s.replace(old, new)
    s = re.sub(r"</?[A-Za-z]+>", " ", s.rpartition("=")[2])  # and stray tags
    s = re.sub(r"(?<![\\A-Za-z])[A-Za-z]{2,}\b", " ", s)  # words, not \commands
    s = re.sub(r"\s+", " ", s).lstrip(" :;,").rstrip(" .:;,")
    return s if s.count("{") == s.count("}") else s.replace("{", "").replace("}", "")


def parse_number(text):
    """'1,234' '$18.00' '50%' '-3/4' '18.0' '1 1/2' -> Fraction, or None. Percent is kept as
    written (50% -> 50), as GSM8K answers are; commas must group thousands."""
    s = text.strip().replace("−", "-").replace("$", "").rstrip("%").strip().rstrip(".")
    mixed = re.fullmatch(r"(-?)(\d+)\s+(\d+)\s*/\s*(\d+)", s)
    if mixed:  # 1 1/2 = 3/2, -2 3/4 = -11/4
        sign, whole, num, den = mixed.groups()
        return None if int(den) == 0 else (-1 if sign else 1) * (int(whole) + Fraction(int(num), int(den)))
    if "," in s and not re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        return None  # commas that do not group thousands: a list, not one number
    s = re.sub(r"^-\s+", "-", re.sub(r"\s*/\s*", "/", s)).replace(",", "")
    # "8 5" is no number; "1e999999" no
    if len(s) > 40 or not re.fullmatch(r"-?(\d+\.?\d*|\.\d+)(/(\d+\.?\d*|\.\d+))?", s):
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(num) / Fraction(den)  # ZeroDivisionError is caught below
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def parse_answer(text):
    """The built-in parser: a cleaned answer (clean_answer) as a Fraction, a frozenset of them (a
    list, as math-verify compares lists), or None. Reads numbers as parse_number does, LaTeX
    fractions and mixed numbers of numbers (\\frac{1}{2}, \\frac12, 1\\frac{1}{2}), inside one pair of
    braces or parentheses or not."""
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    s = re.sub(r"(\d)\s*\\frac\{(\d+)\}\{(\d+)\}", r"\1 \2/\3", s)        # mixed: 1\frac{1}{2} -> 1 1/2
    s = re.sub(r"\\frac\{([\d.]+)\}\{([\d.]+)\}", r"\1/\2", s)
    s = s.replace("\\{", "{").replace("\\}", "}")
    if s[:1] + s[-1:] in ("{}", "()"):
        s = s[1:-1]
    number = parse_number(s)
    if number is not None:
        return number
    items = s.split(",")
    if len(items) > 1:
        values = [parse_answer(item.strip()) for item in items]
        return frozenset(values) if all(isinstance(v, Fraction) for v in values) else None
    return None  # symbols (\\pi/2, x + 1) are math-verify's to judge


def builtin_match(truth, answer):
    """Equal values; an answer in percent may also mean its hundredth (50% = 0.5), as math-verify allows."""
    want, got = parse_answer(clean_answer(truth)), parse_answer(clean_answer(answer))
    if want is None or got is None:
        return False
    return got == want or ("%" in answer and isinstance(got, Fraction) and got / 100 == want)


def as_latex(cleaned):
    """A cleaned answer as math-verify reads it: in $…$, a mixed number written 1\\frac{1}{2}
    (math-verify reads '1 1/2' as 1), percent as \\%."""
    s = re.sub(r"(\d)\s+(\d+)\s*/\s*(\d+)", r"\1\\frac{\2}{\3}", cleaned)
    return "$" + s.replace("%", "\\%") + "$"


def math_verify_match(truth, answer):
    """math-verify's verdict, its LaTeX parser only: its plain-expression parser hands text to
    sympy's parse_expr, which runs eval, and model output never goes there. None when it cannot
    judge (the truth does not parse; or its timeout, which needs the main thread)."""
    from math_verify import LatexExtractionConfig, parse, verify
    latex = [LatexExtractionConfig()]
    try:
        gold = parse(as_latex(clean_answer(truth)), extraction_config=latex)
        if not gold:
            return None
        return bool(verify(gold, parse(as_latex(clean_answer(answer)), extraction_config=latex)))
    except Exception:
        return None


@functools.lru_cache(maxsize=1)
def math_verify_installed():
    return importlib.util.find_spec("math_verify") is not None


# an operation left to do: + * x, or a minus between numbers (not a sign: -3, "1, -2")
EXPRESSION = re.compile(r"[+*×]|\\times|\\cdot|\\div|(?<=[\d)}])\s*-(?=\s*[\d(\\])")


# a plain decimal number: digits, a sign, thousands commas, decimals
PLAIN = re.compile(r"-?(\d+|\d{1,3}(,\d{3})+)(\.\d+)?")


@functools.lru_cache(maxsize=1 << 16)  # the same answer to the same question recurs across a group and steps
def answers_match(truth, answer, checker="auto"):
    """Whether `answer` (extract_answer's text) states `truth`. checker: math_verify, builtin, or
    auto = math_verify when installed (as open-r1 does), else builtin; builtin also decides what
    math-verify cannot, and under auto two plain decimal numbers (PLAIN), where both checkers agree
    (tested) and the built-in one is ~200x cheaper. An answer that leaves an operation to do
    ("8 + 3") does not state a truth that is a number: both checkers would compute it, and a model
    learns to copy the question of a sum into its answer (seen with SmolLM2 on one-digit sums)."""
    cleaned = clean_answer(answer), clean_answer(truth)
    if EXPRESSION.search(cleaned[0]) and not EXPRESSION.search(cleaned[1]):
        return False
    if checker == "auto" and all(PLAIN.fullmatch(c) for c in cleaned):
        return builtin_match(truth, answer)
    if checker == "math_verify" or (checker == "auto" and math_verify_installed()):
        verdict = math_verify_match(truth, answer)
        if verdict is not None:
            return verdict
    return builtin_match(truth, answer)


# ----------------------------------------------------------------------------
# rewards

def format_reward(completion, example):
    """1.0 when the completion is exactly `<think>…</think><answer>…</answer>` (whitespace around
    the blocks allowed), each tag once, both blocks non-empty; else 0.0 (R1-Zero's format reward)."""
    text = completion[:MAX_TEXT]
    if len(TAG.findall(text)) != 4:  # each tag once; also keeps the match below linear
        return 0.0
    match = THINK_ANSWER.fullmatch(text)
    if not match:
        return 0.0
    return 1.0 if match.group(1).strip() and match.group(2).strip() else 0.0


def tags_reward(completion, example):
    """Partial credit for the format: 0.25 for each of <think>, </think>, <answer>, </answer> that
    appears exactly once (open-r1's tag-count reward, in spirit). A model that never writes the
    whole structure still gets a signal towards it, where the strict format reward gives none."""
    text = completion[:MAX_TEXT]
    return 0.25 * sum(text.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))


def accuracy_reward(completion, example):
    """1.0 when the final answer (extract_answer) equals `example["answer"]` (answers_match:
    math-verify when installed, else the built-in parser: `1,234` = 1234, `$18.00` = 18, `50%` =
    50, `3/4` = 0.75, `\\frac{1}{2}`, `1 1/2` = 3/2, `1,2,3` a list), else 0.0."""
    answer = extract_answer(completion)
    return (1.0 if answer is not None and answers_match(str(example["answer"]).strip(), answer.strip())
            else 0.0)


def evaluate_arithmetic(expression):
    """Value of an expression of integers, + - * / and parentheses, as a Fraction.
    Raises ValueError for anything else (names, calls, **, floats), a zero divisor, or an
    intermediate value beyond MAX_MAGNITUDE. Parses with `ast` (never executes it)."""
    if len(expression) > MAX_EXPRESSION:
        raise ValueError("expression too long")
    operators = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
                 ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            result = Fraction(node.value)
        elif isinstance(node, ast.BinOp) and type(node.op) in operators:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            result = operators[type(node.op)](left, right)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            result = -value(node.operand)
        else:
            raise ValueError(f"not allowed: {type(node).__name__}")
        if abs(result) > MAX_MAGNITUDE:
            raise ValueError("value too large")
        return result

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as err:
        raise ValueError(f"not an arithmetic expression: {err}") from None
    return value(tree.body)


def countdown_reward(completion, example):
    """1.0 when the <answer> holds an expression that uses each of `example["numbers"]` exactly
    once and evaluates to `example["target"]` (`expr` or `expr = target` accepted), else 0.0."""
    answers = ANSWER.findall(completion[:MAX_TEXT])
    if not answers:
        return 0.0
    expression = answers[-1].split("=")[0]
    if not re.fullmatch(r"[0-9+\-*/().\s]+", expression):
        return 0.0
    used = sorted(int(n) for n in re.findall(r"[0-9]+", expression))
    if used != sorted(int(n) for n in example["numbers"]):
        return 0.0
    try:
        return 1.0 if evaluate_arithmetic(expression) == example["target"] else 0.0
    except ValueError:
        return 0.0


SCRIPTS = {"en": ("LATIN",), "zh": ("CJK",), "ru": ("CYRILLIC",), "ar": ("ARABIC",),
           "ja": ("HIRAGANA", "KATAKANA", "CJK")}


def language_reward(completion, example):
    """R1's language consistency: the share of letters in the reasoning (<think>, else the whole
    completion) written in the script of `example["language"]` (default "en"). Digits,
    punctuation and symbols do not count; reasoning without letters scores 1.0."""
    text = completion[:MAX_TEXT]
    think = re.search(r"<think>(.*?)(?:</think>|$)", text, re.DOTALL)
    reasoning = think.group(1) if think else text
    scripts = SCRIPTS[example.get("language", "en")]
    letters = [c for c in reasoning if c.isalpha()]
    if not letters:
        return 1.0
    in_script = sum(unicodedata.name(c, "").startswith(scripts) for c in letters)
    return in_script / len(letters)


def overlong_reward(completion, example):
    """DAPO's soft overlong punishment for L = completion_tokens, L_max = max_new_tokens,
    L_cache = overlong_buffer: 0 for L <= L_max - L_cache, then falling linearly to -1 at L_max:
    ((L_max - L_cache) - L) / L_cache, and -1 beyond L_max."""
    length, limit = example["completion_tokens"], example["max_new_tokens"]
    buffer = example.get("overlong_buffer") or 0
    if length <= limit - buffer:
        return 0.0
    if length > limit or buffer == 0:
        return -1.0
    return ((limit - buffer) - length) / buffer


# ----------------------------------------------------------------------------
# not a reward: a measure of R1's reported "aha" behaviour, logged per step

# phrases with which a model re-examines its own reasoning (R1 paper: "wait, wait. that's an aha moment")
REFLECTION = re.compile(r"\b(wait|hmm|let me (re-?check|check|verify|double-check|re-?evaluate|reconsider)|"
                        r"double-check|re-?check|on second thought|alternatively|i made a mistake|"
                        r"that's not right)\b",
                        re.IGNORECASE)


def reflects(completion):
    """True when the reasoning (<think>, else the whole completion) contains a reflection marker."""
    text = completion[:MAX_TEXT]
    think = re.search(r"<think>(.*?)(?:</think>|$)", text, re.DOTALL)
    return bool(REFLECTION.search(think.group(1) if think else text))


REWARDS = {
    "format": format_reward,
    "tags": tags_reward,
    "accuracy": accuracy_reward,
    "countdown": countdown_reward,
    "language": language_reward,
    "overlong": overlong_reward,
}
BUILTIN = frozenset(REWARDS.values())  # pure functions: they read the example and never change it


def parse_reward_spec(spec):
    """'accuracy:1,format:0.5' -> [("accuracy", 1.0), ("format", 0.5)]; a missing weight is 1.
    A reward of your own is SOURCE:FUNCTION[:weight], SOURCE a .py file or an importable module:
    'accuracy:1,my_rewards.py:brevity:0.2' loads brevity(completion, example) -> float from
    my_rewards.py and registers it in REWARDS as "my_rewards.py:brevity". Raises ValueError
    naming the bad part."""
    pairs = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part.startswith("rm:"):
            pairs.append(learned_reward(part))
            continue
        fields = part.split(":")
        custom = len(fields) == 3 or (len(fields) == 2 and fields[0] not in REWARDS
                                      and not is_number(fields[1]))
        name, weight = (":".join(fields[:2]), fields[2:]) if custom else (fields[0], fields[1:])
        weight = weight[0] if weight else ""
        if custom and name not in REWARDS:
            REWARDS[name] = load_function(*fields[:2], takes=("completion", "example"))
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} (known: {', '.join(REWARDS)}; or FILE.py:FUNCTION)")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reward {name!r} has weight {weight!r}, not a number") from None
        if not math.isfinite(w):
            raise ValueError(f"reward {name!r} has weight {weight!r}, not finite")
        pairs.append((name, w))
    if not pairs:
        raise ValueError("no reward given")
    return pairs


def learned_reward(part):
    """'rm:PATH[:weight]' -> ("rm:PATH", weight): a reward model at PATH (reward_model.py), checked
    now and registered in REWARDS once; its weights load at its first call."""
    path, _, weight = part[3:].rpartition(":")
    path, weight = (path, weight) if path and is_number(weight) else (part[3:], "1")
    name = f"rm:{path}"
    if not path.strip():
        raise ValueError("rm: needs the path of a reward model (rm:PATH or rm:PATH:weight)")
    if name not in REWARDS:
        from reward_model import RewardModel
        REWARDS[name] = RewardModel(os.path.expanduser(path))
    w = float(weight)
    if not math.isfinite(w):
        raise ValueError(f"reward {name!r} has weight {weight!r}, not finite")
    return name, w


def is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def safe_reward(fn, completion, example):
    """fn(completion, example) -> (value, failed). A call that raises (SystemExit too) or returns
    anything but a real number within ±MAX_REWARD scores (0.0, failed=True). A function of your
    own gets its own copy of the example, so it cannot change the data for later calls. A
    KeyboardInterrupt inside it is passed on as SIGINT: while training, the run saves and stops."""
    try:
        value = fn(completion, example if fn in BUILTIN else copy.deepcopy(example))
        if isinstance(value, numbers.Real) and abs(value) <= MAX_REWARD:  # False for NaN
            return float(value), False
    except KeyboardInterrupt:
        pass_interrupt_on()
    except BaseException:
        pass
    return 0.0, True



def pass_interrupt_on():
    """A KeyboardInterrupt caught inside a reward, raised again as SIGINT: while training, the run
    saves and stops (SIG_DFL: a SIGINT already asked it to)."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)


def score(texts, examples, lengths, spec, correct, shared):
    """Rewards [N, K] of completion i (of question examples[i // G], G = N / len(examples)) under
    each of the K (name, weight) pairs of spec; a reward that fails scores 0 and is counted. Also
    correct(...) [N], the task's own judgement. Each call's example holds the question's fields,
    `completion_tokens` (lengths[i]) and `shared` (language, max_new_tokens, overlong_buffer). A
    batched reward (a reward model) takes every completion at once, on the device of `lengths`.
    -> (scores, failed calls, correct)."""
    G = len(texts) // len(examples)
    scores, failures, right = torch.zeros(len(texts), len(spec)), 0, torch.zeros(len(texts))
    contexts = [dict(examples[i // G], completion_tokens=int(lengths[i]), **shared)
                for i in range(len(texts))]
    for j, (name, _) in enumerate(spec):
        if getattr(REWARDS[name], "batched", False):  # a reward model: every completion in one call
            scores[:, j], failed = safe_batch_reward(REWARDS[name], texts, contexts, lengths.device)
            failures += failed
            continue
        for i, text in enumerate(texts):
            scores[i, j], failed = safe_reward(REWARDS[name], text, contexts[i])
            failures += failed
    for i, text in enumerate(texts):
        right[i] = safe_reward(correct, text, contexts[i])[0]
    return scores, failures, right


def safe_batch_reward(fn, texts, contexts, device):
    """A batched reward's values [N] and how many failed: a value that is not a real number within
    ±MAX_REWARD scores 0 and counts; a call that raises scores every row 0 and counts them all."""
    try:
        values = torch.as_tensor(fn(texts, contexts, device), dtype=torch.float64).reshape(len(texts))
    except KeyboardInterrupt:
        pass_interrupt_on()
        return torch.zeros(len(texts)), len(texts)
    except BaseException:  # SystemExit too, as safe_reward
        return torch.zeros(len(texts)), len(texts)
    good = values.abs() <= MAX_REWARD  # False for NaN
    return torch.where(good, values, 0.0).float(), int((~good).sum())
