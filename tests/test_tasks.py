"""Benchmark loaders, prompt formats, and the synthetic reasoning tasks."""

from __future__ import annotations

import csv
import itertools
import json
import types
from pathlib import Path

import pytest

from dreamtune import grading, tasks
from dreamtune.tasks import synthetic

EVAL = Path(__file__).resolve().parents[1].parent / "shared/data/eval"
needs_eval = pytest.mark.skipif(not EVAL.is_dir(), reason=f"shared eval data absent ({EVAL})")


# ---------------------------------------------------------------------------------------------
# benchmarks
# ---------------------------------------------------------------------------------------------


@needs_eval
@pytest.mark.parametrize("name, count", [("gsm8k", 1319), ("math500", 500), ("aime24", 30), ("aime25", 30), ("amc23", 40)])
def test_local_benchmarks_load(name, count):
    rows = tasks.load(name, data_dir=EVAL)
    assert len(rows) == count
    assert len({r["id"] for r in rows}) == count
    for r in rows:
        assert r["task"] == name
        assert isinstance(r["id"], str) and isinstance(r["question"], str) and r["question"].strip()
        assert isinstance(r["answer"], str) and r["answer"].strip()
        if name in ("gsm8k", "aime24", "aime25", "amc23"):
            assert r["answer"].lstrip("-").isdigit(), r["answer"]  # "025" -> "25", 27.0 -> "27", no commas
        if name.startswith("aime"):
            assert 0 <= int(r["answer"]) <= 999 and r["answer"] == str(int(r["answer"]))
    assert tasks.load(name, data_dir=EVAL, limit=3) == rows[:3]


@needs_eval
def test_local_answers_match_the_files():
    raw = [json.loads(x) for x in (EVAL / "aime24/test.jsonl").read_text().splitlines()]
    assert raw[7]["answer"] == "025" and tasks.load("aime24", EVAL)[7]["answer"] == "25"
    gsm = tasks.load("gsm8k", EVAL)
    assert gsm[0]["answer"] == "18" and gsm[0]["solution"].endswith("#### 18")
    assert any(r["solution"].rsplit("####", 1)[1].strip() == "1,450,000" and r["answer"] == "1450000" for r in gsm)
    math = tasks.load("math500", EVAL)
    assert math[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)" and math[0]["id"] == "test/precalculus/807.json"
    assert tasks.load("amc23", EVAL)[0]["answer"] == "27" and tasks.load("aime25", EVAL)[0]["answer"] == "70"
    # a JSONL file given directly works too
    assert len(tasks.load("aime25", EVAL / "aime25/test.jsonl")) == 30


def test_missing_local_data_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match=r"gsm8k/test.jsonl"):
        tasks.load("gsm8k", data_dir=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        tasks.load("math500", data_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
        tasks.load("gsm9k")
    with pytest.raises(ValueError, match="sudoku/test.jsonl"):  # a synthetic task read from a folder without its file
        tasks.load("sudoku", data_dir=tmp_path)


def test_hub_failure_suggests_data_dir(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(__import__("sys").modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    for name, repo in [("gsm8k", "openai/gsm8k"), ("math500", "HuggingFaceH4/MATH-500"), ("aime25", "math-ai/aime25")]:
        with pytest.raises(ValueError, match=rf"{repo}.*no network.*--data-dir"):
            tasks.load(name)


def test_hub_rows_are_normalised(monkeypatch):
    fake = {"HuggingFaceH4/aime_2024": [{"id": 60, "problem": "P?", "answer": "025", "url": "u"}],
            "math-ai/amc23": [{"id": 0, "question": "Q?", "answer": 27.0}]}
    monkeypatch.setitem(__import__("sys").modules, "datasets",
                        types.SimpleNamespace(load_dataset=lambda repo, *a, **k: fake[repo]))
    assert tasks.load("aime24") == [{"id": "60", "task": "aime24", "question": "P?", "answer": "25", "url": "u"}]
    assert tasks.load("amc23")[0]["answer"] == "27"


def test_gpqa_only_from_a_user_file(tmp_path):
    with pytest.raises(ValueError, match="--data-dir FILE"):
        tasks.load("gpqa")
    with pytest.raises(ValueError, match="no GPQA file"):
        tasks.load("gpqa", data_dir=tmp_path)
    f = tmp_path / "g.jsonl"
    f.write_text(
        json.dumps({"question": "Q1?", "choices": ["a", "b", "c", "d"], "answer": "C"}) + "\n"
        + json.dumps({"question": "Q2?", "choices": ["a", "b", "c", "d"], "answer": 1}) + "\n"
        + json.dumps({"question": "Q3?", "choices": ["w", "x", "y", "z"], "answer": "z"}) + "\n"
    )
    rows = tasks.load("gpqa", data_dir=f)
    assert [r["answer"] for r in rows] == ["C", "B", "D"]
    assert rows[0]["question"] == "Q1?\n\nA) a\nB) b\nC) c\nD) d" and rows[0]["choices"] == ["a", "b", "c", "d"]

    official = tmp_path / "gpqa_diamond.csv"
    with official.open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"])
        w.writeheader()
        for i in range(5):
            w.writerow({"Record ID": f"r{i}", "Question": f"Q{i}?", "Correct Answer": "right",
                        "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"})
    a, b = tasks.load("gpqa", data_dir=tmp_path), tasks.load("gpqa", data_dir=official)
    assert a == b  # the directory is searched; shuffling is seeded per row
    for r in a:
        assert r["choices"][ord(r["answer"]) - ord("A")] == "right" and sorted(r["choices"]) == ["right", "w1", "w2", "w3"]
    assert len({r["answer"] for r in a}) > 1  # the right answer is not always in the same place

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "E"}) + "\n")
    with pytest.raises(ValueError, match="letter A-D"):
        tasks.load("gpqa", data_dir=bad)
    bad.write_text(json.dumps({"question": "Q?", "choices": ["a", "b"], "answer": "A"}) + "\n")
    with pytest.raises(ValueError, match="exactly 4"):
        tasks.load("gpqa", data_dir=bad)


# ---------------------------------------------------------------------------------------------
# prompt formats
# ---------------------------------------------------------------------------------------------

ROW = {"id": "0", "task": "gsm8k", "question": "Tom has 2 apples and buys 3 more. How many?", "answer": "5"}


def test_chat_format():
    msgs = tasks.build_prompt(ROW, "chat")
    assert msgs[0] == {"role": "system", "content": tasks.DEFAULT_SYSTEM_PROMPT}
    assert msgs[1]["role"] == "user" and msgs[1]["content"].startswith(ROW["question"])
    assert msgs[1]["content"].endswith("put your final answer within \\boxed{}.")
    assert tasks.build_prompt(ROW, "chat", system_prompt=None) == msgs[1:]
    assert tasks.build_prompt(ROW, "chat", system_prompt=None, instruction="")[0]["content"] == ROW["question"]
    gp = tasks.build_prompt({"question": "Q?\n\nA) a\nB) b\nC) c\nD) d"}, "chat", task="gpqa")
    assert "letter of the correct choice" in gp[-1]["content"]


def test_fewshot_format():
    text = tasks.build_prompt(ROW, "fewshot")
    assert isinstance(text, str) and "<|im_start|>" not in text
    blocks = text.split("\n\nQuestion: ")
    assert len(blocks) == 9  # 8 GSM8K exemplars, as in the Dream paper, then the question
    assert text.startswith("Question: ") and text.endswith(f"Question: {ROW['question']}\nAnswer:")
    assert all("\nAnswer: " in b and "#### " in b for b in blocks[:-1])
    math_text = tasks.build_prompt({**ROW, "task": "math500"}, "fewshot")
    assert math_text.count("Question: ") == 5 and "\\boxed{" in math_text  # MATH 4-shot
    assert tasks.build_prompt(ROW, "fewshot", k=0) == f"Question: {ROW['question']}\nAnswer:"
    shots = [{"question": "1+1?", "solution": "2\n#### 2"}]
    assert tasks.build_prompt(ROW, "fewshot", shots=shots) == f"Question: 1+1?\nAnswer: 2\n#### 2\n\nQuestion: {ROW['question']}\nAnswer:"
    with pytest.raises(ValueError, match="only 1 shots"):
        tasks.build_prompt(ROW, "fewshot", shots=shots, k=2)
    with pytest.raises(ValueError, match="unknown prompt format"):
        tasks.build_prompt(ROW, "zeroshot")
    with pytest.raises(ValueError, match="question"):
        tasks.build_prompt({"id": 1}, "chat")


def test_builtin_exemplars_grade_correct():
    for task in ("gsm8k", "math500", "aime24", "gpqa"):
        for ex in tasks.fewshot_examples(task):
            answer, how = grading.extract_answer(ex["solution"], "gpqa" if task == "gpqa" else None)
            assert answer and how in ("hash", "boxed"), ex


@needs_eval
def test_fewshot_from_train_split():
    shots = tasks.fewshot_examples("gsm8k", k=8, data_dir=EVAL, seed=0)
    assert len(shots) == 8 and shots == tasks.fewshot_examples("gsm8k", k=8, data_dir=EVAL, seed=0)
    assert shots != tasks.fewshot_examples("gsm8k", k=8, data_dir=EVAL, seed=1)
    test_questions = {r["question"] for r in tasks.load("gsm8k", EVAL)}
    assert not any(s["question"] in test_questions for s in shots)


def test_truncate_response():
    gen = " 2 + 3 = 5\n#### 5\n\nQuestion: Ann has 4 cats...\nAnswer: #### 9"
    assert tasks.truncate_response(gen, "fewshot") == " 2 + 3 = 5\n#### 5\n"
    assert grading.extract_answer(tasks.truncate_response(gen, "fewshot")) == ("5", "hash")
    assert tasks.truncate_response("\\boxed{5}<|im_end|>junk", "chat") == "\\boxed{5}"


# ---------------------------------------------------------------------------------------------
# synthetic tasks
# ---------------------------------------------------------------------------------------------

SETTINGS = [
    ("arithmetic", {}),
    ("arithmetic", {"op": "add"}),
    ("arithmetic", {"op": "mix", "digits": 2, "digits2": [1, 3]}),
    ("arithmetic", {"op": "mul", "digits": 3, "digits2": 3}),
    ("sudoku", {}),
    ("sudoku", {"blanks": 8}),
]


@pytest.mark.parametrize("task, opts", SETTINGS)
def test_synthetic_deterministic_and_varied(task, opts):
    a = synthetic.make_rows(task, 50, seed=0, **opts)
    assert a == synthetic.make_rows(task, 50, seed=0, **opts)
    b = synthetic.make_rows(task, 50, seed=1, **opts)
    assert a != b
    assert len({r["prompt"] for r in a}) >= 40  # varied within a seed too
    for r in a:
        assert set(r) == {"prompt", "response", "answer"}


@pytest.mark.parametrize("task, opts", SETTINGS)
def test_synthetic_responses_grade_correct(task, opts):
    rows = synthetic.make_rows(task, 100, seed=3, **opts)
    chars = set(synthetic.alphabet(task))
    for r in rows:
        assert r["response"].rsplit("\n", 1)[1] == f"Answer: {r['answer']}"
        assert synthetic.grade_synthetic(task, r["response"], r["answer"])
        assert set(r["prompt"] + r["response"]) <= chars
        # the benchmark grader reads the same answer
        assert grading.extract_answer(r["response"])[1] == "answer_colon"
    others = [r["answer"] for r in rows[1:]] + [rows[0]["answer"]]
    for r, other in zip(rows, others):
        if other != r["answer"]:
            assert not synthetic.grade_synthetic(task, r["response"], other)
    assert not synthetic.grade_synthetic(task, "no answer line", rows[0]["answer"])
    assert not synthetic.grade_synthetic(task, "", rows[0]["answer"])


def test_arithmetic_is_right_and_short():
    for r in synthetic.make_rows("arithmetic", 300, seed=5, op="mix"):
        a, op, b = r["prompt"].rstrip("=?").partition("*") if "*" in r["prompt"] else r["prompt"].rstrip("=?").partition("+")
        assert r["answer"] == str(int(a) * int(b) if op == "*" else int(a) + int(b))
        assert len(r["prompt"]) + len(r["response"]) < 100  # defaults: well under ~100 characters
        for line in r["response"].split("\n")[:-1]:  # every written step is true arithmetic
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs), line
    row = synthetic.make_rows("arithmetic", 1, seed=0, op="mul", digits=3, digits2=2)[0]
    assert len(row["response"].split("\n")) >= 2


def _brute_force_solutions(grid):
    blanks = [(r, c) for r in range(4) for c in range(4) if grid[r][c] == 0]
    found = []
    for vals in itertools.product(range(1, 5), repeat=len(blanks)):
        g = [row[:] for row in grid]
        for (r, c), v in zip(blanks, vals):
            g[r][c] = v
        units = g + [list(col) for col in zip(*g)]
        units += [[g[r][c] for r in (br, br + 1) for c in (bc, bc + 1)] for br in (0, 2) for bc in (0, 2)]
        if all(sorted(u) == [1, 2, 3, 4] for u in units):
            found.append(g)
    return found


@pytest.mark.parametrize("blanks", [1, 4, 6])
def test_sudoku_unique_and_consistent(blanks):
    for r in synthetic.make_rows("sudoku", 25, seed=blanks, blanks=blanks):
        grid = synthetic.parse_sudoku(r["prompt"])
        assert sum(v == 0 for row in grid for v in row) == blanks
        sols = _brute_force_solutions(grid)
        assert len(sols) == 1
        assert r["answer"] == " ".join("".join(map(str, row)) for row in sols[0])
        # each filling line names a blank cell and its solution value, every blank once
        steps = r["response"].split("\n")[:-1]
        assert len(steps) == blanks
        cells = set()
        for s in steps:
            rc, v = s.split("=")
            row_i, col_i = int(rc[1]) - 1, int(rc[3]) - 1
            assert grid[row_i][col_i] == 0 and sols[0][row_i][col_i] == int(v)
            cells.add((row_i, col_i))
        assert len(cells) == blanks
        assert len(r["prompt"]) + len(r["response"]) <= 120 or blanks > 6


def test_synthetic_option_errors():
    with pytest.raises(ValueError, match="unknown synthetic task"):
        synthetic.make_rows("chess", 1, 0)
    with pytest.raises(ValueError, match="unknown option"):
        synthetic.make_rows("sudoku", 1, 0, size=9)
    with pytest.raises(ValueError, match="blanks"):
        synthetic.make_rows("sudoku", 1, 0, blanks=14)
    with pytest.raises(ValueError, match="op"):
        synthetic.make_rows("arithmetic", 1, 0, op="div")
    with pytest.raises(ValueError, match="digits2"):
        synthetic.make_rows("arithmetic", 1, 0, digits2=(3, 1))
    with pytest.raises(ValueError, match="seed"):
        synthetic.make_rows("arithmetic", 1, None)
    assert synthetic.make_rows("arithmetic", 0, 0) == []
    assert synthetic.alphabet("sudoku") == "".join(sorted(set(synthetic.alphabet("sudoku"))))


def test_synthetic_tasks_are_benchmarks(tmp_path):
    """arithmetic and sudoku load like benchmarks (a file, or rows made with the held-out seed), prompt as the
    bare question they were trained on, refuse the few-shot format, and grade exactly."""
    import json

    from dreamtune import grading, tasks
    from dreamtune.tasks.synthetic import HELD_OUT_SEED, make_rows

    made = tasks.load("arithmetic", limit=5)
    assert [r["question"] for r in made] == [r["prompt"] for r in make_rows("arithmetic", 5, HELD_OUT_SEED)]
    (tmp_path / "sudoku").mkdir()
    rows = make_rows("sudoku", 3, seed=7)
    (tmp_path / "sudoku" / "test.jsonl").write_text("".join(json.dumps({"question": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    loaded = tasks.load("sudoku", data_dir=tmp_path)
    assert [(r["id"], r["question"], r["answer"]) for r in loaded] == [(str(i), r["prompt"], r["answer"]) for i, r in enumerate(rows)]
    assert tasks.build_prompt(loaded[0], "chat", task="sudoku", system_prompt=None) == [{"role": "user", "content": rows[0]["prompt"]}]
    with pytest.raises(ValueError, match="no few-shot format"):
        tasks.build_prompt(loaded[0], "fewshot", task="sudoku")
    right, wrong = rows[0]["response"], rows[0]["response"].replace("Answer:", "Answer: 9")
    verdicts = grading.grade_many([{"response": right, "answer": rows[0]["answer"]},
                                   {"response": wrong, "answer": rows[0]["answer"]}], "sudoku")
    assert [v["correct"] for v in verdicts] == [True, False] and verdicts[0]["stage"] == "exact"
