"""Task data: the arith generator, the benchmark loaders, prompts, preference pairs."""

from __future__ import annotations

import json
import random
import re

import pytest
from pydantic import ValidationError

from stages.config.task import ArithDifficulty
from stages.data import arith, preferences, problems
from stages.data.arith import arith_problems, arith_split
from stages.data.grading import BOXED_DATASETS, NUMERIC_DATASETS, grade
from stages.data.preferences import preference_pairs_from_hf, preference_pairs_from_problems
from stages.data.problems import DATA_DIR_ENV, format_prompt, load_problems
from stages.data.records import DataError, PreferencePair, Problem

ALL_OPS = ArithDifficulty(min_ops=1, max_ops=3, max_operand=12, operations=("+", "-", "*", "/"))


# ---------------------------------------------------------------------------------------------
# arith
# ---------------------------------------------------------------------------------------------
def evaluate_question(question: str) -> tuple[int, list[str]]:
    """Read the arithmetic back out of the problem text, independently of the generator."""
    sentences = re.findall(r"[^.?]+[.?]", question)
    total = int(re.search(r"has (\d+) ", sentences[0]).group(1))
    ops = []
    for sentence in sentences[1:-1]:
        b = int(re.search(r"(\d+)", sentence).group(1))
        if re.search(r"(buys|finds) \d+ more|gives \w+ \d+ more", sentence):
            total, op = total + b, "+"
        elif re.search(r"(gives away|loses|sells) \d+", sentence):
            total, op = total - b, "-"
        elif "times as many" in sentence:
            total, op = total * b, "*"
        elif "equal piles" in sentence:
            assert total % b == 0, question
            total, op = total // b, "/"
        else:
            raise AssertionError(f"unrecognised step {sentence!r}")
        assert total >= 0, question
        ops.append(op)
    assert sentences[-1].strip().startswith("How many"), question
    return total, ops


def test_arith_first_problem_by_hand():
    (p,) = arith_problems("train", 1, seed=0)
    assert p.question == "Lea has 2 cards. Lea sells 1. How many cards does Lea have now?"
    assert p.solution == "2 - 1 = 1\n#### 1"  # 2 - 1 = 1, by hand
    assert (p.answer, p.dataset) == ("1", "arith")


def test_arith_is_deterministic_and_seed_dependent():
    a, b = arith_problems("train", 200, seed=3), arith_problems("train", 200, seed=3)
    assert a == b
    other = arith_problems("train", 200, seed=4)
    assert sum(x.question != y.question for x, y in zip(a, other, strict=True)) > 150
    assert arith_problems("train", 50, seed=3) == a[:50]  # a longer list extends a shorter one


@pytest.mark.parametrize("seed", [0, 1])
def test_arith_train_and_test_never_overlap(seed):
    train = arith_problems("train", 4000, seed=seed, difficulty=ALL_OPS)
    test = arith_problems("test", 1000, seed=seed, difficulty=ALL_OPS)
    train_q, test_q = {p.question for p in train}, {p.question for p in test}
    assert len(train_q) == 4000 and len(test_q) == 1000  # distinct within a split
    assert train_q.isdisjoint(test_q)
    assert {p.id for p in train}.isdisjoint({p.id for p in test})
    assert {arith_split(q) for q in train_q} == {"train"}
    assert {arith_split(q) for q in test_q} == {"test"}
    # another seed's test split still never meets this train split
    assert train_q.isdisjoint({p.question for p in arith_problems("test", 1000, seed=seed + 10)})


def test_arith_split_is_about_a_fifth_test_and_ignores_case_and_spacing():
    train = arith_problems("train", 500, seed=0)
    assert all(arith_split("  " + p.question.upper().replace(" ", "   ")) == "train" for p in train)
    # the generator's raw stream is split ~80/20 by the hash
    texts = [arith._sample_arith(random.Random(i), ALL_OPS)[0] for i in range(2000)]
    share = sum(arith_split(t) == "test" for t in texts) / len(texts)
    assert 0.16 < share < 0.24


@pytest.mark.parametrize("difficulty", [ArithDifficulty(), ALL_OPS], ids=["default", "all_ops"])
def test_arith_answers_match_independent_evaluation(difficulty):
    for p in arith_problems("train", 300, seed=5, difficulty=difficulty) + arith_problems(
        "test", 100, seed=5, difficulty=difficulty
    ):
        expected, ops = evaluate_question(p.question)
        lines = p.solution.split("\n")
        assert lines[-1] == f"#### {expected}" and p.answer == str(expected)
        assert difficulty.min_ops <= len(ops) <= difficulty.max_ops
        assert set(ops) <= set(difficulty.operations)
        for line in lines[:-1]:  # every worked step is true arithmetic
            x, op, b, y = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)", line).groups()
            assert eval(f"{x} {op.replace('/', '//')} {b}") == int(y)
            assert 1 <= int(b) <= difficulty.max_operand
        assert grade("arith", p.solution, p.answer)


def test_arith_difficulty_knobs():
    hard = ArithDifficulty(min_ops=3, max_ops=3, max_operand=50, operations=("*",))
    for p in arith_problems("train", 50, seed=0, difficulty=hard):
        _, ops = evaluate_question(p.question)
        assert ops == ["*", "*", "*"]
    with pytest.raises(ValidationError):
        ArithDifficulty(operations=("^",))
    with pytest.raises(ValidationError):
        ArithDifficulty(max_operands=3)  # unknown knob
    with pytest.raises(DataError, match=r"max_ops \(1\) < min_ops \(2\)"):
        arith_problems("train", 1, seed=0, difficulty=ArithDifficulty(min_ops=2, max_ops=1))
    with pytest.raises(DataError, match="splits 'train' and 'test'"):
        arith_problems("validation", 1, seed=0)


def test_arith_asking_for_more_problems_than_exist_fails_clearly():
    tiny_space = ArithDifficulty(min_ops=1, max_ops=1, max_operand=2, operations=("+",))
    with pytest.raises(
        DataError, match=r"only \d+ distinct test problems at this difficulty, asked for 2000"
    ):
        arith_problems("test", 2000, seed=0, difficulty=tiny_space)


# ---------------------------------------------------------------------------------------------
# benchmark loaders
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, split, count",
    [("gsm8k", "train", 7473), ("gsm8k", "test", 1319), ("aime24", "test", 30), ("aime25", "test", 30),
     ("math500", "test", 500)],
)  # fmt: skip
def test_every_data_file_loads(data_dir, name, split, count):
    problems = load_problems(name, split)
    assert len(problems) == count
    assert len({p.id for p in problems}) == count
    assert all(p.dataset == name and p.question.strip() and p.answer for p in problems)
    if name != "math500":
        assert all(re.fullmatch(r"-?\d+", p.answer) for p in problems), "integer answers, no commas"
    assert load_problems(name, split, limit=3) == problems[:3]


def test_loaded_records_by_hand(data_dir):
    gsm = load_problems("gsm8k", "test", limit=1)[0]
    assert gsm.id == "gsm8k/test/0" and gsm.question.startswith("Janet")
    assert gsm.answer == "18" and gsm.solution.endswith("#### 18")
    comma = [p for p in load_problems("gsm8k", "test") if re.search(r"#### [\d,]*,", p.solution)]
    assert len(comma) == 14  # the README's count of thousands separators in test
    assert all(p.answer == p.solution.rsplit("#### ", 1)[1].replace(",", "") for p in comma)
    assert "2125" in {p.answer for p in comma}  # `#### 2,125`
    aime24 = load_problems("aime24", limit=1)[0]
    assert (aime24.id, aime24.answer) == ("aime24/60", "204") and aime24.solution
    aime25 = load_problems("aime25", limit=1)[0]
    assert (aime25.id, aime25.answer, aime25.solution) == ("aime25/2025-I-1", "70", None)
    math = load_problems("math500", limit=1)[0]
    assert math.id == "math500/test/precalculus/807.json"
    assert math.answer == r"\left( 3, \frac{\pi}{2} \right)"


def test_load_arith_through_the_same_entry_point():
    assert load_problems("arith", "test", limit=5) == arith_problems("test", 5, seed=0)


def test_unknown_dataset_and_split_are_one_line():
    with pytest.raises(
        ValueError, match="unknown dataset 'gsm9k'; known: arith, gsm8k, aime24, aime25, math500$"
    ):
        load_problems("gsm9k")
    with pytest.raises(DataError, match="dataset 'aime24' has no split 'train'; it has: test") as info:
        load_problems("aime24", "train")
    assert "\n" not in str(info.value)


def test_missing_file_names_path_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError) as info:
        load_problems("math500")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "math500" / "test.jsonl") in message and DATA_DIR_ENV in message


def test_bad_record_names_file_line_and_field(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    path = tmp_path / "gsm8k" / "test.jsonl"
    path.parent.mkdir()
    rows = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}, {"question": "2+2?"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: record has no field 'answer'$"):
        load_problems("gsm8k")
    path.write_text('{"question": "1+1?", "answer": "2"}\n')
    with pytest.raises(DataError, match=r":1: field 'answer' has no '#### ' final answer"):
        load_problems("gsm8k")
    path.write_text('{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n\n{"question": \n')
    with pytest.raises(DataError, match=r":3: not valid JSON"):
        load_problems("gsm8k")
    assert len(load_problems("gsm8k", limit=1)) == 1  # the bad line is past the limit


def test_hub_fallback_maps_fields(monkeypatch):
    """Without RLPIPE_DATA_DIR the loader asks `datasets.load_dataset` (faked here: no network)."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(
            {"problem": ["What is 1/2 + 1/2?"], "answer": ["1"], "solution": [r"\boxed{1}"], "unique_id": ["u/1"],
             "subject": ["Algebra"]}
        )  # fmt: skip

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_problems("math500") == [
        Problem("math500/u/1", "math500", "What is 1/2 + 1/2?", "1", r"\boxed{1}")
    ]
    assert calls == [("HuggingFaceH4/MATH-500", None, "test")]


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\ntraceback..."
        )

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_problems("gsm8k", "train")
    message = str(info.value)
    assert "\n" not in message and "openai/gsm8k" in message and DATA_DIR_ENV in message


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
def test_prompts_per_dataset():
    arith = arith_problems("test", 1, seed=0)[0]
    prompt = format_prompt(arith)
    assert arith.question in prompt and "#### N" in prompt and prompt.endswith("Answer:\n")
    math = Problem("m/1", "math500", "What is $x$ if $x^{2}=4$ and x>0?", "2")
    assert format_prompt(math) == (
        "What is $x$ if $x^{2}=4$ and x>0?\n"
        "Please reason step by step, and put your final answer within \\boxed{}."
    )
    assert format_prompt(math, "gsm8k").startswith("Question: What is $x$")  # by registry name
    assert format_prompt(math, "Q: {question} A:") == "Q: What is $x$ if $x^{2}=4$ and x>0? A:"
    with pytest.raises(DataError, match="neither a known name"):
        format_prompt(math, "no placeholder")
    # every dataset and every grader a user's dataset may name has a prompt, and every prompt a grader
    assert set(problems.DATASET_NAMES) <= set(problems.PROMPT_TEMPLATES)
    assert set(problems.PROMPT_TEMPLATES) == NUMERIC_DATASETS | BOXED_DATASETS


# ---------------------------------------------------------------------------------------------
# preference pairs
# ---------------------------------------------------------------------------------------------
def test_arith_preference_pairs_are_correct_vs_wrong():
    problems = arith_problems("train", 300, seed=1, difficulty=ALL_OPS)
    pairs = preference_pairs_from_problems(problems, seed=0)
    assert len(pairs) > 0.9 * len(problems)  # only pairs with a later division can be dropped
    by_prompt = {format_prompt(p): p for p in problems}
    step_errors = 0
    for pair in pairs:
        problem = by_prompt[pair.prompt]
        assert pair.chosen == problem.solution and pair.margin is None
        assert grade("arith", pair.chosen, problem.answer)
        assert not grade("arith", pair.rejected, problem.answer)
        chosen_lines, rejected_lines = pair.chosen.split("\n"), pair.rejected.split("\n")
        assert len(chosen_lines) == len(rejected_lines)
        step_errors += chosen_lines[:-2] != rejected_lines[:-2] or (
            len(chosen_lines) == 2 and chosen_lines[0] != rejected_lines[0]
        )
    assert 0.3 < step_errors / len(pairs) < 0.7  # about half: a wrong step that propagates
    assert preference_pairs_from_problems(problems, seed=0) == pairs
    assert preference_pairs_from_problems(problems, seed=1) != pairs


def test_propagated_step_error_by_hand():
    """3 + 4 = 7, 7 * 2 = 14, 14 - 5 = 9: exactly one result is wrong, every later step starts from
    the wrong amount and is itself computed right, so the final answer is wrong."""
    solution = "3 + 4 = 7\n7 * 2 = 14\n14 - 5 = 9\n#### 9"
    steps = [preferences._STEP_LINE.match(line) for line in solution.split("\n")[:-1]]
    corrupted_at = set()
    for seed in range(30):
        lines = preferences._corrupt_step(steps, random.Random(seed)).split("\n")
        parsed = [re.fullmatch(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)", line).groups() for line in lines[:-1]]
        assert [(op, b) for _, op, b, _ in parsed] == [("+", "4"), ("*", "2"), ("-", "5")]
        assert parsed[0][0] == "3"
        assert all(parsed[i][0] == parsed[i - 1][3] for i in (1, 2))  # each step starts from the last result
        wrong = [i for i, (x, op, b, y) in enumerate(parsed) if eval(f"{x} {op} {b}") != int(y)]
        assert len(wrong) == 1
        corrupted_at.add(wrong[0])
        assert lines[-1] == f"#### {parsed[-1][3]}" and lines[-1] != "#### 9"
    assert corrupted_at == {0, 1, 2}


def test_gsm8k_and_math_preference_pairs(data_dir):
    gsm = load_problems("gsm8k", "train", limit=200)
    pairs = preference_pairs_from_problems(gsm, seed=0)
    assert len(pairs) == 200
    for problem, pair in zip(gsm, pairs, strict=True):
        assert grade("gsm8k", pair.chosen, problem.answer) and not grade(
            "gsm8k", pair.rejected, problem.answer
        )
        assert (
            pair.rejected.rsplit("#### ", 1)[0] == pair.chosen.rsplit("#### ", 1)[0]
        )  # only the answer changed
    math = load_problems("math500", limit=60)
    pairs = preference_pairs_from_problems(math, seed=0)
    integer_answers = [p for p in math if re.fullmatch(r"-?\d+", p.answer)]
    assert 0 < len(pairs) <= len(integer_answers)
    for pair in pairs:
        problem = next(p for p in math if format_prompt(p) == pair.prompt)
        assert grade("math500", pair.chosen, problem.answer) and not grade(
            "math500", pair.rejected, problem.answer
        )


def _pair_columns():
    return {
        "question": ["1+1?", "2+2?", "3+3?"],
        "good": ["#### 2", "#### 4", "#### 6"],
        "bad": ["#### 3", "#### 5", "#### 7"],
        "score_gap": [1.0, 0.5, None],
    }


def test_preference_pairs_from_a_saved_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_dict(_pair_columns()).save_to_disk(str(tmp_path / "flat"))
    pairs = preference_pairs_from_hf(
        str(tmp_path / "flat"), "train", "question", "good", "bad", margin_field="score_gap"
    )
    assert pairs == [
        PreferencePair("1+1?", "#### 2", "#### 3", 1.0),
        PreferencePair("2+2?", "#### 4", "#### 5", 0.5),
        PreferencePair("3+3?", "#### 6", "#### 7", None),
    ]
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(_pair_columns())}).save_to_disk(
        str(tmp_path / "dict")
    )
    limited = preference_pairs_from_hf(str(tmp_path / "dict"), "test", "question", "good", "bad", limit=2)
    assert [p.chosen for p in limited] == ["#### 2", "#### 4"]
    with pytest.raises(DataError, match="no split 'train'"):
        preference_pairs_from_hf(str(tmp_path / "dict"), "train", "question", "good", "bad")


def test_preference_pairs_from_jsonl_with_chat_messages(tmp_path):
    path = tmp_path / "pairs.jsonl"
    row = {
        "prompt": "Say hi",
        "chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
        "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}],
    }
    path.write_text(json.dumps(row) + "\n")
    assert preference_pairs_from_hf(str(path)) == [PreferencePair("Say hi", "Hi!", "No.", None)]
    assert preference_pairs_from_hf(str(path), prompt_field=None)[0].prompt == ""


def test_preference_pairs_missing_field_is_one_line(tmp_path):
    import datasets

    datasets.Dataset.from_dict(_pair_columns()).save_to_disk(str(tmp_path / "flat"))
    with pytest.raises(DataError) as info:
        preference_pairs_from_hf(str(tmp_path / "flat"), "train", "question", "chosen", "bad")
    assert str(info.value) == (
        f"{tmp_path / 'flat'} (train): no field 'chosen' (fields: question, good, bad, score_gap)"
    )
