import contextlib
import math
import signal
from unittest import mock

import pytest
from hypothesis import given, settings, strategies as st

import rewards as R


@contextlib.contextmanager
def hang_guard(seconds=10):
    """Fail instead of hanging if a reward does not return: a bound on work, far above normal."""
    def fail(signum, frame):
        raise AssertionError(f"a reward ran for more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

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
    assert R.overlong_reward("", {"completion_tokens": 17, "max_new_tokens": 16, "overlong_buffer": 0}) == -1.0


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
    for fn in R.REWARDS.values():
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
    LEAVES, lambda inner: st.builds(lambda a, op, b: f"({a}{op}{b})", inner, st.sampled_from(list("+-*/%") + ["**", "//"]), inner),
    max_leaves=40)
COMPLETIONS = st.one_of(
    st.text(max_size=400),
    EXPRESSIONS,
    EXPRESSIONS.map(lambda e: f"<think>try</think><answer>{e}</answer>"),
    st.builds(lambda a, b, c: f"<think>{a}</think><answer>{b}</answer>{c}", st.text(), EXPRESSIONS, st.text()),
    st.integers(1, 3000).map(lambda n: "(" * n + "1" + ")" * n),
    st.integers(1, 3000).map(lambda n: "<answer>" + "(" * n + "</answer>"),
)


@settings(max_examples=400, deadline=None)
@given(text=COMPLETIONS, numbers=st.lists(st.integers(0, 10**6), max_size=6), target=st.integers(-10**9, 10**9),
       tokens=st.integers(0, 10**6))
def test_every_reward_returns_a_finite_float_and_never_runs_code(text, numbers, target, tokens):
    example = {"answer": str(target), "numbers": numbers, "target": target, "completion_tokens": tokens,
               "max_new_tokens": 512, "overlong_buffer": 64, "language": "en"}
    refuse = mock.Mock(side_effect=AssertionError("a reward tried to run code"))
    with mock.patch("builtins.eval", refuse), mock.patch("builtins.exec", refuse), hang_guard():
        for name, fn in R.REWARDS.items():
            value = fn(text, example)
            assert type(value) is float and math.isfinite(value), name
    refuse.assert_not_called()
