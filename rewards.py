"""Rule-based rewards for GRPO: small pure functions `(completion, example) -> float`.

`completion` is the model's text after the prompt, untrusted: nothing here ever passes it to
eval/exec, and every function is bounded in time by the length caps below. `example` is the task's
dict (`question`, `answer`, and for countdown `numbers` + `target`); the trainer adds
`completion_tokens`, `max_new_tokens`, `overlong_buffer` and `language` to it.

REWARDS maps the names used in the config (`rewards="accuracy:1,format:0.5"`) to the functions.
"""
import ast
import math
import re
import unicodedata
from fractions import Fraction

MAX_TEXT = 20_000        # characters of a completion a reward will look at
MAX_EXPRESSION = 200     # characters of a countdown expression
MAX_MAGNITUDE = 10**12   # countdown intermediate values beyond this are rejected

THINK_ANSWER = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
TAG = re.compile(r"</?(think|answer)>")
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
NUMBER = re.compile(r"-?\$?\s*\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?%?|-?\.\d+%?")


# ----------------------------------------------------------------------------
# answer extraction

def parse_number(text):
    """'1,234' '$18.00' '50%' '-3/4' '18.0' -> Fraction, or None. Percent is kept as written
    (50% -> 50), as GSM8K answers are."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip("%").rstrip(".")
    if not s or len(s) > 40:
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(num) / Fraction(den)  # ZeroDivisionError is caught below
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text):
    """The last number written in `text`, as a Fraction, or None."""
    for match in reversed(NUMBER.findall(text)):
        value = parse_number(match)
        if value is not None:
            return value
    return None


def extract_answer(completion):
    """The final answer: last <answer>…</answer>, else last \\boxed{…}, else last number in the text."""
    text = completion[:MAX_TEXT]
    answers = ANSWER.findall(text)
    if answers:
        return last_number(answers[-1])
    boxed = BOXED.findall(text)
    if boxed:
        return last_number(boxed[-1])
    return last_number(text)


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


def accuracy_reward(completion, example):
    """1.0 when the extracted answer equals `example["answer"]` numerically
    (commas, `$`, `%`, `18.0` vs `18`, fractions), else 0.0."""
    truth = parse_number(str(example["answer"]))
    guess = extract_answer(completion)
    return 1.0 if truth is not None and guess is not None and guess == truth else 0.0


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


SCRIPTS = {"en": ("LATIN",), "zh": ("CJK",), "ru": ("CYRILLIC",), "ar": ("ARABIC",), "ja": ("HIRAGANA", "KATAKANA", "CJK")}


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
                        r"double-check|re-?check|on second thought|alternatively|i made a mistake|that's not right)\b",
                        re.IGNORECASE)


def reflects(completion):
    """True when the reasoning (<think>, else the whole completion) contains a reflection marker."""
    text = completion[:MAX_TEXT]
    think = re.search(r"<think>(.*?)(?:</think>|$)", text, re.DOTALL)
    return bool(REFLECTION.search(think.group(1) if think else text))


REWARDS = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "countdown": countdown_reward,
    "language": language_reward,
    "overlong": overlong_reward,
}


def parse_reward_spec(spec):
    """'accuracy:1,format:0.5' -> [("accuracy", 1.0), ("format", 0.5)]; a missing weight is 1.
    Raises ValueError naming the bad part."""
    pairs = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition(":")
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} (known: {', '.join(REWARDS)})")
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


def safe_reward(fn, completion, example):
    """fn(completion, example), with an error or a non-finite value scored as (0.0, failed=True)."""
    try:
        value = float(fn(completion, example))
    except Exception:
        return 0.0, True
    return (value, False) if math.isfinite(value) else (0.0, True)
