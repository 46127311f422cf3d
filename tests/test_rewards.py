import contextlib
import math
import re
import signal
from unittest import mock

import pytest
from hypothesis import given, settings, strategies as st

import rewards as R


@contextlib.contextmanager
def hang_guard(seconds=10):
    """Fail instead of hanging if a reward does not return: a bound on work, far above normal. It
    counts CPU time (SIGVTALRM), as math-verify keeps SIGALRM for its own timeouts."""
    def fail(signum, frame):
        raise AssertionError(f"a reward ran for more than {seconds} s of CPU time")
    previous = signal.signal(signal.SIGVTALRM, fail)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)

GOOD = "<think>7+8=15,4+3+1=8</think><answer>85</answer>"


@pytest.mark.parametrize("text, expected", [
    (GOOD, 1.0),
    ("  <think>a</think>\n<answer>b</answer>\n", 1.0),
    ("<think>a</think><answer>b</answer> trailing", 0.0),
    ("lead <think>a</think><answer>b</answer>", 0.0),
    ("<think>a</think>", 0.0),
    ("<answer>85</answer>", 0.0),
    ("<think><think>a</think></think><answer>b</answer>", 0.0),   # nested
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),  # repeated
    ("<think></think><answer>85</answer>", 0.0),                 # empty reasoning
    ("<think>a</think><answer> </answer>", 0.0),                 # empty answer
    ("<answer>b</answer><think>a</think>", 0.0),                 # wrong order
    ("", 0.0),
    ("<think>思考</think><answer>85</answer>", 1.0),
])
def test_format(text, expected):
    assert R.format_reward(text, {}) == expected


@pytest.mark.parametrize("text, expected", [
    (GOOD, 1.0),
    ("<think>a</think> 85", 0.5),
    ("<think>a", 0.25),
    ("85", 0.0),
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.5),   # a repeated tag earns nothing
    ("<answer>b</answer><think>a</think>", 1.0),                    # order is the strict format's concern
])
def test_tags_give_partial_credit(text, expected):
    assert R.tags_reward(text, {}) == expected


@pytest.mark.parametrize("text, truth, expected", [
    (GOOD, "85", 1.0),
    ("<think>x</think><answer>84</answer>", "85", 0.0),
    ("<answer>1,234</answer>", "1234", 1.0),
    ("<answer>$18.00</answer>", "18", 1.0),
    ("<answer>18.0</answer>", "18", 1.0),
    ("<answer>50%</answer>", "50", 1.0),
    ("<answer>3/4</answer>", "0.75", 1.0),
    ("<answer>-7</answer>", "-7", 1.0),
    ("<answer>-7</answer>", "7", 0.0),
    ("<answer>The answer is 42.</answer>", "42", 1.0),
    ("so 1 + 2 = 3, and \\boxed{12}", "12", 1.0),          # boxed beats the last number
    ("blah 3 then 41", "41", 1.0),                          # no tags: last number
    ("<answer>12</answer> and later 99", "12", 1.0),        # the answer tag wins
    ("<answer>1/0</answer>", "0", 0.0),
    ("<answer>" + "9" * 5000 + "</answer>", "9", 0.0),      # huge number: no crash, no match
    ("", "0", 0.0),
    ("<answer>١٢</answer>", "5", 0.0),                      # non-ASCII digits
    ("<answer>no number</answer>", "1", 0.0),
])
def test_accuracy(text, truth, expected):
    assert R.accuracy_reward(text, {"answer": truth}) == expected


# forms a final answer takes: (completion, truth, right?). Both checkers must give each verdict.
HARD_FORMS = [
    ("<answer>1,2,3</answer>", "123", False),               # a list, not a number with commas
    ("<answer>1,2,3</answer>", "1,2,3", True),
    ("<answer>3, 2, 1</answer>", "1,2,3", True),            # lists compare as sets, as math-verify's do
    ("<answer>1,234</answer>", "1234", True),               # thousands separators
    ("<answer>1,000,000</answer>", "1000000", True),
    ("<answer>1{,}000</answer>", "1000", True),             # LaTeX's thousands separator
    ("\\boxed{\\frac{1}{2}}", "0.5", True),                 # nested braces in \boxed
    ("\\boxed{\\frac{1}{2}}", "2", False),
    ("<answer>\\boxed{\\frac{1}{2}}</answer>", "1/2", True),
    ("<answer>\\dfrac34</answer>", "0.75", True),
    ("<answer>\\frac12</answer>", "0.5", True),
    ("<answer>$\\frac{1}{3}$</answer>", "1/3", True),
    ("<answer>0.333</answer>", "1/3", False),
    ("<answer>1 1/2</answer>", "1.5", True),                # a mixed number, not 1/2
    ("<answer>1 1/2</answer>", "0.5", False),
    ("<answer>1\\frac{1}{2}</answer>", "3/2", True),
    ("<answer>-1 1/2</answer>", "-1.5", True),
    ("we are left with 1 1/2 cups", "1.5", True),
    ("<answer>-3</answer>", "-3", True),                    # negative numbers
    ("<answer>−3</answer>", "-3", True),                    # a Unicode minus
    ("<answer>-3</answer>", "3", False),
    ("<answer>$18.00</answer>", "18", True),                # units and currency
    ("<answer>\\$18</answer>", "18", True),
    ("<answer>18 dollars</answer>", "18", True),
    ("<answer>10\\text{ cm}</answer>", "10", True),
    ("<answer>50%</answer>", "50", True),
    ("<answer>x = 2</answer>", "2", True),
    ("<answer>3+4=7</answer>", "7", True),
    ("<answer>3+4</answer>", "7", False),                   # an operation left to do is no answer
    ("<answer>8 - 1</answer>", "7", False),
    ("<answer>2 \\times 3.5</answer>", "7", False),
    ("<answer>-7, 2</answer>", "2,-7", True),               # signs are not operations
    ("<answer>The answer is 42.</answer>", "42", True),
    ("<answer>8 5</answer>", "85", False),                  # two numbers are not one
    # the last <answer> opened (sampled from the demo model)
    ("<answer></think><answer>90</answer>", "90", True),
    ("<answer>}84</answer>", "84", True),                   # a stray brace (sampled too)
    ("<answer>Total: 42</answer>", "42", True),
    ("<answer>(42)</answer>", "42", True),
    ("<answer>1/0</answer>", "0", False),
    ("<answer>no number</answer>", "1", False),
]
CHECKERS = ["builtin", pytest.param("math_verify", marks=pytest.mark.skipif(
    not R.math_verify_installed(), reason="math-verify is not installed (pip install math-verify)"))]


@pytest.mark.parametrize("checker", CHECKERS)
def test_both_checkers_agree_on_hard_answer_forms(checker):
    wrong = [(text, truth) for text, truth, right in HARD_FORMS
             if R.answers_match(truth, R.extract_answer(text).strip(), checker) != right]
    assert not wrong


def test_math_verify_decides_when_installed(monkeypatch):
    """auto = math-verify when it is installed: a symbolic equality only it can see."""
    if not R.math_verify_installed():
        pytest.skip("math-verify is not installed")
    assert (R.answers_match("\\sqrt{8}", "2\\sqrt{2}", "auto")
            and not R.answers_match("\\sqrt{8}", "2\\sqrt{2}", "builtin"))
    assert R.answers_match("x+1", "1+x", "auto")      # an expression answers a truth that is one
    R.answers_match.cache_clear()
    monkeypatch.setattr(R, "math_verify_installed", lambda: False)
    assert not R.answers_match("\\sqrt{8}", "2\\sqrt{2}", "auto")   # the built-in parser, offline
    R.answers_match.cache_clear()


def test_parse_number():
    assert R.parse_number("1,000") == 1000
    assert R.parse_number(" $3.50 ") == R.parse_number("7/2")
    assert R.parse_number("abc") is None
    assert R.parse_number("1/0") is None


COUNTDOWN = {"numbers": [3, 5, 7], "target": 22}


@pytest.mark.parametrize("answer, expected", [
    ("3*5+7", 1.0),
    ("(7+5)*3-14", 0.0),        # 14 is not a given number
    ("3*5+7 = 22", 1.0),
    ("7+3*5", 1.0),
    ("3*5", 0.0),               # 7 unused
    ("3*5+7+7-7", 0.0),         # 7 used three times
    ("3*5+7.0", 0.0),           # float literal
    ("(3+5)*7/0", 0.0),         # division by zero
    ("3**5+7", 0.0),            # power is rejected
    ("9**9**9", 0.0),
    ("__import__('os').system('echo hacked')", 0.0),
    ("(" * 150 + "3*5+7" + ")" * 150, 0.0),  # too deep / too long
    ("", 0.0),
])
def test_countdown(answer, expected):
    assert R.countdown_reward(f"<think>t</think><answer>{answer}</answer>", COUNTDOWN) == expected


def test_countdown_rejects_huge_values_before_computing_them():
    example = {"numbers": [99999999] * 6, "target": 1}
    with hang_guard():
        assert R.countdown_reward("<answer>" + "*".join(["99999999"] * 6) + "</answer>", example) == 0.0
    with pytest.raises(ValueError, match="too large"):
        R.evaluate_arithmetic("*".join(["99999999"] * 6))


def test_evaluate_arithmetic():
    assert R.evaluate_arithmetic("(1+2)*3/2") == R.parse_number("9/2")
    assert R.evaluate_arithmetic("-4+1") == -3
    for bad in ("2**3", "abs(1)", "1.5", "x", "1/(2-2)", "10**13"):
        with pytest.raises(ValueError):
            R.evaluate_arithmetic(bad)


def test_language():
    assert R.language_reward("<think>all english here</think><answer>1</answer>", {"language": "en"}) == 1.0
    assert R.language_reward("<think>abcd思考</think>", {"language": "en"}) == pytest.approx(4 / 6)
    assert R.language_reward("<think>abcd思考</think>", {"language": "zh"}) == pytest.approx(2 / 6)
    assert R.language_reward("<think>1+2=3</think>", {"language": "en"}) == 1.0   # no letters
    assert R.language_reward("no tags at all", {}) == 1.0


@pytest.mark.parametrize("length, expected", [(10, 0.0), (12, 0.0), (14, -0.5), (16, -1.0), (20, -1.0)])
def test_overlong(length, expected):
    # L_max = 16, L_cache = 4: free up to 12, then ((16 - 4) - L) / 4
    example = {"completion_tokens": length, "max_new_tokens": 16, "overlong_buffer": 4}
    assert R.overlong_reward("", example) == expected


def test_overlong_without_buffer_punishes_only_truncation():
    assert R.overlong_reward("", {"completion_tokens": 16, "max_new_tokens": 16, "overlong_buffer": 0}) == 0.0
    assert R.overlong_reward("", {"completion_tokens": 17, "max_new_tokens": 16,
                                  "overlong_buffer": 0}) == -1.0


def test_safe_reward_turns_errors_and_nan_into_zero():
    def boom(c, e):
        raise RuntimeError("bad")
    assert R.safe_reward(boom, "x", {}) == (0.0, True)
    assert R.safe_reward(lambda c, e: math.nan, "x", {}) == (0.0, True)
    assert R.safe_reward(lambda c, e: 0.5, "x", {}) == (0.5, False)
    assert R.safe_reward(R.accuracy_reward, "5", {}) == (0.0, True)   # example without answer


@pytest.mark.parametrize("text", ["", "\x00\x01", "<answer>" * 1000, "<think>" + "x" * 100_000, "é" * 30_000,
                                  "<answer>" + "(" * 5000 + "</answer>", "1" * 100_000])
def test_every_reward_survives_adversarial_text(text):
    example = {"answer": "3", "numbers": [1, 2], "target": 3, "completion_tokens": 5, "max_new_tokens": 8}
    for fn in R.BUILTIN:  # not the rewards of your own that other tests registered
        with hang_guard():
            assert math.isfinite(fn(text, example))


def test_parse_reward_spec():
    assert R.parse_reward_spec("accuracy:1,format:0.5") == [("accuracy", 1.0), ("format", 0.5)]
    assert R.parse_reward_spec("accuracy") == [("accuracy", 1.0)]
    for bad in ("accurracy", "accuracy:x", "accuracy:nan", ""):
        with pytest.raises(ValueError):
            R.parse_reward_spec(bad)


# ----------------------------------------------------------------------------
# property-based: arbitrary and adversarial text never crashes, hangs or runs code

LEAVES = st.one_of(
    st.integers(-10**40, 10**40).map(str),
    st.sampled_from(["9**9**9", "1/0", "0/0", "1e309", "nan", "inf", "-0", "__import__('os').system('true')",
                     "open('x','w')", "(lambda: 1)()", "[1]*10**9", "'a'*10**9", "x", "٣", "１２"]),
    st.text(st.characters(whitelist_categories=("Nd",)), min_size=1, max_size=5),
)
EXPRESSIONS = st.recursive(
    LEAVES, lambda inner: st.builds(lambda a, op, b: f"({a}{op}{b})", inner,
                                    st.sampled_from(list("+-*/%") + ["**", "//"]), inner),
    max_leaves=40)
COMPLETIONS = st.one_of(
    st.text(max_size=400),
    EXPRESSIONS,
    EXPRESSIONS.map(lambda e: f"<think>try</think><answer>{e}</answer>"),
    st.builds(lambda a, b, c: f"<think>{a}</think><answer>{b}</answer>{c}", st.text(), EXPRESSIONS,
              st.text()),
    st.integers(1, 3000).map(lambda n: "(" * n + "1" + ")" * n),
    st.integers(1, 3000).map(lambda n: "<answer>" + "(" * n + "</answer>"),
)


# math-verify's LaTeX parser makes each number it reads with sympy.Number(text), and sympy parses that
# text with its own parser (parse_expr, which ends in eval). So the guard: eval and exec only from
# inside sympy (which also builds code from its own templates) or the import system, and sympy's
# parser only ever given a numeral the LaTeX lexer read, never other model text.
NUMERAL = re.compile(r"[0-9.,eE+\-]+")


@contextlib.contextmanager
def no_model_text_run():
    import sys
    import sympy.parsing.sympy_parser as sympy_parser
    refused, real_parse = [], sympy_parser.parse_expr

    def guarded(real):
        def run(source, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if not (caller.startswith(("sympy.", "importlib"))
                    or getattr(source, "co_filename", "").endswith(".py")):
                refused.append(source)
                raise AssertionError(f"{caller} ran {source!r}")
            return real(source, *args, **kwargs)
        return run

    def importing():  # sympy's modules parse their own constants as they load ('yotta', ...)
        frame = sys._getframe(2)
        while frame and "importlib._bootstrap" not in frame.f_code.co_filename:
            frame = frame.f_back
        return frame is not None

    def parse_expr(text, *args, **kwargs):
        if not (NUMERAL.fullmatch(str(text).strip()) or importing()):
            refused.append(text)
            raise AssertionError(f"sympy's parser was given {text!r}")
        return real_parse(text, *args, **kwargs)
    with mock.patch("builtins.eval", guarded(eval)), mock.patch("builtins.exec", guarded(exec)), \
            mock.patch.object(sympy_parser, "parse_expr", parse_expr), hang_guard():
        yield refused
    assert not refused


@settings(max_examples=400, deadline=None)
@given(text=COMPLETIONS, numbers=st.lists(st.integers(0, 10**6), max_size=6),
       target=st.integers(-10**9, 10**9), tokens=st.integers(0, 10**6))
@pytest.mark.slow
def test_every_reward_returns_a_finite_float_and_never_runs_code(text, numbers, target, tokens):
    example = {"answer": str(target), "numbers": numbers, "target": target, "completion_tokens": tokens,
               "max_new_tokens": 512, "overlong_buffer": 64, "language": "en"}
    with no_model_text_run():
        for name, fn in R.REWARDS.items():
            if fn not in R.BUILTIN:  # a reward of your own that another test registered
                continue
            value = fn(text, example)
            assert type(value) is float and math.isfinite(value), name


@pytest.mark.parametrize("text", ["<answer>__import__('os').system('touch PWNED')</answer>",
                                  "<answer>9**9**9</answer>", "<answer>\\frac{__import__('os')}{2}</answer>",
                                  "\\boxed{exec('1')}", "<answer>open('x','w')</answer>",
                                  "<answer>1e999999999</answer>", "<answer>(1,2)</answer>"])
@pytest.mark.parametrize("checker", CHECKERS)
def test_answer_checkers_run_no_model_text(text, checker, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    R.answers_match.cache_clear()
    with no_model_text_run():
        assert R.answers_match("3", R.extract_answer(text), checker) is False
    assert not (tmp_path / "PWNED").exists()
