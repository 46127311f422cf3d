import json
import os

import pytest

import data
import rewards as R
from conftest import SHARED


def test_arithmetic_is_seeded_disjoint_and_worked_solutions_are_right():
    train, test = data.arithmetic_task(seed=0, n_test=200)
    again, _ = data.arithmetic_task(seed=0, n_test=200)
    other, _ = data.arithmetic_task(seed=1, n_test=200)
    assert train == again and train != other
    assert len(test) == 200 and len(train) + len(test) == 90 * 90
    assert not {e["question"] for e in train} & {e["question"] for e in test}
    for example in train[:500]:
        assert R.accuracy_reward(example["solution"], example) == 1.0
        assert R.format_reward(example["solution"], example) == 1.0


def test_worked_solution_shows_the_carries():
    assert data.addition_example(47, 38)["solution"] == "<think>7+8=15,4+3+1=8</think><answer>85</answer>"
    assert data.addition_example(95, 17)["solution"] == "<think>5+7=12,9+1+1=11</think><answer>112</answer>"


def test_countdown_targets_are_reachable_and_disjoint():
    train, test = data.countdown_task(seed=0, n_train=300, n_test=50)
    key = lambda e: (tuple(sorted(e["numbers"])), e["target"])  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in test}
    for example in test:
        assert 3 <= len(example["numbers"]) <= 4 and 1 <= example["target"] <= 999
        assert str(example["target"]) in example["question"]


def test_gsm8k_original_format_loads():
    train, test = data.load_task("gsm8k", 0, os.path.join(SHARED, "train.jsonl"),
                                 os.path.join(SHARED, "test.jsonl"), eval_size=2000)
    assert len(train) == 7473 and len(test) == 1319
    first = json.loads(open(os.path.join(SHARED, "train.jsonl")).readline())
    assert train[0]["question"] == first["question"]
    assert train[0]["answer"] == first["answer"].split("####")[-1].strip().replace(",", "")
    assert "<<" not in train[0]["solution"] and R.format_reward(train[0]["solution"], {}) == 1.0
    # the holdout split without an eval file
    train2, test2 = data.load_task("gsm8k", 0, os.path.join(SHARED, "test.jsonl"), eval_size=19)
    assert len(test2) == 19 and len(train2) == 1300


@pytest.mark.parametrize("lines, message", [
    (['{"question": "q", "answer": "x #### 1"}', "{not json"], ":2: not valid JSON"),
    (['{"question": "q"}'], ":1: missing or empty string field 'answer'"),
    (['{"question": "q", "answer": "no final"}'], ":1: 'answer' does not end with '#### <number>'"),
    (['[1, 2]'], ":1: expected a JSON object"),
    ([""], ": no examples"),
])
def test_malformed_gsm8k_names_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError) as err:
        data.load_file(str(path), data.gsm8k_example)
    assert str(err.value).startswith(str(path) + message)


def test_generic_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": 4, "extra": 1}\n\n{"prompt": "3+3?", "answer": "6"}\n')
    rows = data.load_file(str(path), data.jsonl_example)
    assert rows[0]["question"] == "2+2?" and rows[0]["answer"] == "4" and rows[0]["extra"] == 1
    path.write_text('{"prompt": "2+2?"}\n')
    with pytest.raises(data.DataError, match=":1: missing field 'answer'"):
        data.load_file(str(path), data.jsonl_example)


def test_missing_file():
    with pytest.raises(data.DataError, match="no such file"):
        data.load_task("jsonl", 0, "/nonexistent.jsonl")


def test_templates():
    example = {"question": "12+34"}
    assert data.render_prompt(example, "plain") == "12+34\n"
    r1 = data.render_prompt(example, "r1zero")
    assert (r1.startswith("A conversation between User and Assistant.")
            and r1.endswith("User: 12+34. Assistant:"))
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in r1

    class ChatTokenizer:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"
    chat = data.render_prompt(example, "chat", ChatTokenizer())
    assert chat.startswith("system:A conversation") and chat.endswith("|user:12+34|assistant:")
