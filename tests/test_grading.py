"""Grader golden cases (GSM8K and MATH styles), the process pool and its timeouts, `dreamtune grade`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from dreamtune import grade_cli, grading
from dreamtune.grading import extract_answer, grade, grade_many, summarize

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data"
GSM8K_TEST = SHARED / "eval/gsm8k/test.jsonl"

try:
    import math_verify  # noqa: F401

    HAVE_MV = True
except ImportError:
    HAVE_MV = False
needs_mv = pytest.mark.skipif(not HAVE_MV, reason="math-verify is not installed (pip install 'dreamtune[eval]')")

# (response, reference, correct, stage, how); stage/how None = not checked
GSM8K_CASES = [
    ("She sells 9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18", True, "exact", "hash"),
    ("Total: 16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is 18.", "18", True, "exact", "answer_colon"),
    ("So she makes 18 dollars every day", "18", True, "exact", "last_number"),
    ("#### 1,450,000", "1450000", True, "exact", "hash"),
    ("It costs $1,200 in total.", "1200", True, "exact", "last_number"),
    ("Answer: 18 dollars", "18", True, "exact", "answer_colon"),
    ("**Answer:** 42", "42", True, "exact", "answer_colon"),
    ("Answer:\n72", "72", True, "exact", "answer_colon"),
    ("<answer>42</answer>", "42", True, "exact", "answer_tag"),
    ("<answer>The answer is 42.</answer>", "42", True, "exact", "answer_tag"),
    ("The temperature drops to -5 degrees.", "-5", True, "exact", "last_number"),
    ("5-3=2, so the answer is 2", "2", True, "exact", "answer_colon"),
    ("The answer is 18.00", "18", True, "exact", "answer_colon"),
    ("She pays \\boxed{18}.", "She makes 9 * 2 = $18\n#### 18", True, "exact", "boxed"),  # full solution as ref
    ("The answer is 17.", "18", False, "none", "answer_colon"),
    ("#### 18\nWait, 5 + 3 = 8", "18", True, "exact", "hash"),  # an explicit marker beats a later number
    ("I am not sure how to solve this.", "18", False, "none", "none"),
    ("", "18", False, "none", "none"),
    # percent policy: "50%" == "50", but not 0.5
    ("The answer is 50%.", "50", True, "exact", "answer_colon"),
    ("The discount is \\boxed{50}", "50\\%", True, "exact", "boxed"),
    ("\\boxed{0.5}", "50\\%", False, "none", "boxed"),
    ("\\boxed{50\\%}", "0.5", False, "none", "boxed"),
]

MATH_CASES = [
    # fractions
    ("So the answer is \\boxed{\\frac{1}{2}}.", "0.5", True, "numeric", "boxed"),
    ("\\boxed{0.5}", "\\frac{1}{2}", True, "numeric", "boxed"),
    ("\\boxed{1/2}", "\\frac12", True, "numeric", "boxed"),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True, "exact", "boxed"),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", True, "numeric", "boxed"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", True, "numeric", "boxed"),
    ("\\boxed{\\frac{1}{3}}", "0.5", False, "none", "boxed"),
    ("The final answer is $\\frac{14}{3}$.", "\\frac{14}{3}", True, "exact", "answer_colon"),
    # roots and pi, nested braces
    ("\\boxed{11\\sqrt2}", "11\\sqrt{2}", True, "exact", "boxed"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True, "exact", "boxed"),
    ("\\boxed{\\pi}", "\\pi", True, "exact", "boxed"),
    ("\\boxed{2\\pi}", "\\pi", False, "none", "boxed"),
    # intervals and tuples
    ("\\boxed{[2, 5)}", "[2,5)", True, "exact", "boxed"),
    ("\\boxed{(-\\infty, 3] \\cup [5, \\infty)}", "(-\\infty,3]\\cup[5,\\infty)", True, "exact", "boxed"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3, \\frac{\\pi}{2})", True, "exact", "boxed"),
    # units, text, degrees, assignments, complex numbers
    ("\\boxed{5\\text{ cm}}", "5", True, "exact", "boxed"),
    ("The width is \\boxed{12 \\text{ inches}}.", "12", True, "exact", "boxed"),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True, "exact", "boxed"),
    ("The answer is Evelyn.", "\\text{Evelyn}", True, "exact", "answer_colon"),
    ("\\boxed{90^\\circ}", "90", True, "exact", "boxed"),
    ("\\boxed{90}", "90^\\circ", True, "exact", "boxed"),
    ("\\boxed{x=5}", "5", True, "exact", "boxed"),
    ("\\boxed{5}", "x=5", True, "exact", "boxed"),
    ("\\boxed{6-5i}", "6 - 5i", True, "exact", "boxed"),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True, "exact", "boxed"),
    # LaTeX row breaks and escaped dollars survive normalisation
    ("So the answer is $\\begin{pmatrix}-2\\\\-14\\end{pmatrix}$.", "\\begin{pmatrix} -2 \\\\ -14 \\end{pmatrix}", True, "exact", "answer_colon"),
    ("The answer is $\\$32,\\!348$.", "\\$32,\\!348", True, "exact", "answer_colon"),
    # several boxed answers: the last one counts
    ("First guess \\boxed{2}. That is wrong; correcting: \\boxed{3}", "3", True, "exact", "boxed"),
    ("First guess \\boxed{3}. That is wrong; correcting: \\boxed{2}", "3", False, "none", "boxed"),
    ("Put your answer in \\boxed{}. So the answer is 7.", "7", True, "exact", "answer_colon"),  # empty box echo
    ("\\fbox{7}", "7", True, "exact", "boxed"),
    ("\\boxed 7", "7", True, "exact", "boxed"),
    # AIME leading zeros, float and int references
    ("\\boxed{25}", "025", True, "exact", "boxed"),
    ("\\boxed{025}", 25, True, "exact", "boxed"),
    ("The answer is 73.", "073", True, "exact", "answer_colon"),
    ("\\boxed{21}", 21.0, True, "exact", "boxed"),
    ("so we get 21.0", 21, True, "exact", "last_number"),
    ("\\boxed{26}", "025", False, "none", "boxed"),
]

MV_CASES = [  # need math-verify (symbolic equivalence)
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True, "math_verify", "boxed"),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", True, "math_verify", "boxed"),
    ("\\boxed{(2,5)}", "[2,5)", False, "none", "boxed"),
    ("\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", True, "math_verify", "boxed"),
    ("\\boxed{1, -2}", "-2, 1", True, "math_verify", "boxed"),
    ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True, "math_verify", "boxed"),
    ("\\boxed{-q+p}", "p - q", True, "math_verify", "boxed"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True, "math_verify", "boxed"),
    ("\\boxed{0.333333}", "\\frac{1}{3}", True, "math_verify", "boxed"),  # 6-decimal rounding
    ("\\boxed{3.14}", "\\pi", False, "none", "boxed"),
]

# Malformed boxes as real models write them: each shape is read by its own rule (`how`), and for each a
# near-miss stays wrong, because the repair reads only what the box holds and only where it is a box.
MALFORMED_CASES = [
    # unclosed before </answer>: the tag shows the model finished its answer
    ("The total is 78.\n<answer>\\boxed{78</answer>", "78", True, "exact", "boxed_unclosed"),
    ("<answer>\\boxed{\\frac{1}{2}</answer>", "0.5", True, "numeric", "boxed_unclosed"),
    ("So 3 + 75 = 78, and the answer is <answer>$\\boxed{78$</answer>", "78", True, "exact", "boxed_unclosed"),
    #   near-misses: the content is graded as written, not its first number; a box spanning lines is no box
    ("<answer>\\boxed{78 + 5</answer>", "78", False, "none", "boxed_unclosed"),
    ("<answer>\\boxed{78\nWait, I dropped the 2 extra apples, so the total is 80</answer>", "78", False, "none",
     "answer_tag"),
    # no backslash
    ("She has 3 * 9 = 27 marbles, so boxed{27}.", "27", True, "exact", "boxed_no_backslash"),
    ("<answer>boxed{\\frac{3}{4}}</answer>", "\\frac{3}{4}", True, "exact", "boxed_no_backslash"),
    #   near-misses: a word ending in "boxed" is not the command; a bare box holding an expression is that
    ("She unboxed{27} cards and kept 30.", "27", False, "none", "last_number"),
    ("Thus boxed{27 - 2}", "27", False, "none", "boxed_no_backslash"),
    # an empty box, the answer written right after it
    ("The final answer is \\boxed{}32", "32", True, "exact", "boxed_after_empty"),
    ("Total: $\\boxed{}$ 32.\n", "32", True, "exact", "boxed_after_empty"),
    #   near-misses: an echoed instruction followed by a numbered list or by working is not an answer
    ("Put the final answer within \\boxed{}1. First, 3 + 4 = 7", "1", False, "none", "last_number"),
    ("\\boxed{}3 + 29 = 32", "3", False, "none", "last_number"),
    # a well-formed box anywhere beats every repair; a box cut at the end of the text is not repaired
    ("boxed{27}, no: \\boxed{25}", "27", False, "none", "boxed"),
    ("The answer is 789, so \\boxed{78", "78", False, "none", "answer_colon"),
]

GPQA_CASES = [
    ("The electron is negative, so the answer is \\boxed{C}.", "C", True, "exact", "boxed"),
    ("Answer: (B)", "B", True, "exact", "answer_colon"),
    ("I think option D fits best.", "D", True, "exact", "last_number"),
    ("The answer is \\boxed{A}", "C", False, "none", "boxed"),
    ("No idea.", "A", False, "none", "none"),
]


def _check(case, task=None):
    response, ref, correct, stage, how = case
    v = grade(response, ref, task)
    assert v["correct"] is correct, (case, v)
    assert v["stage"] == stage, (case, v)
    assert v["how"] == how, (case, v)


def test_enough_golden_cases():
    assert len(GSM8K_CASES) + len(MATH_CASES) + len(MV_CASES) + len(GPQA_CASES) >= 40


@pytest.mark.parametrize("case", GSM8K_CASES, ids=lambda c: repr(c[0])[:40])
def test_gsm8k_golden(case):
    _check(case, "gsm8k")


@pytest.mark.parametrize("case", MATH_CASES, ids=lambda c: repr(c[0])[:40])
def test_math_golden(case):
    _check(case, "math500")


@needs_mv
@pytest.mark.parametrize("case", MV_CASES, ids=lambda c: repr(c[0])[:40])
def test_math_verify_golden(case):
    _check(case, "math500")


@pytest.mark.parametrize("case", MALFORMED_CASES, ids=lambda c: repr(c[0])[:40])
def test_malformed_box_golden(case):
    _check(case, "gsm8k")
    _check(case, "math500")


def test_malformed_boxes_in_a_pool_and_counted_by_rule(tmp_path, capsys):
    """grade_many gives the same verdicts as grade; `dreamtune grade` prints how many answers each rule read."""
    rows = [{"response": r, "answer": a} for r, a, *_ in MALFORMED_CASES]
    assert [v["how"] for v in grade_many(rows, "gsm8k", workers=0)] == [c[4] for c in MALFORMED_CASES]
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert grade_cli.main(["--task", "gsm8k", "--predictions", str(preds), "--workers", "0"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("answers found by:"))
    for rule in ("boxed_unclosed", "boxed_no_backslash", "boxed_after_empty"):
        assert f"{rule} {sum(c[4] == rule for c in MALFORMED_CASES)}," in line


@pytest.mark.parametrize("case", GPQA_CASES, ids=lambda c: repr(c[0])[:40])
def test_gpqa_golden(case):
    _check(case, "gpqa")


def test_extraction_details():
    # nested and escaped braces inside a box
    assert extract_answer("\\boxed{\\frac{\\sqrt{3}}{2}}") == ("\\frac{\\sqrt{3}}{2}", "boxed")
    assert extract_answer("so \\boxed{\\{1,2\\}} done") == ("\\{1,2\\}", "boxed")
    # an unclosed box (a truncated generation) is ignored
    assert extract_answer("we get 12, so \\boxed{12") == ("12", "last_number")
    # precedence: boxed > answer tag > #### > "Answer:" > last number
    assert extract_answer("Answer: 3\n#### 4\n<answer>5</answer> \\boxed{6}") == ("6", "boxed")
    assert extract_answer("Answer: 3\n#### 4\n<answer>5</answer> 7") == ("5", "answer_tag")
    assert extract_answer("#### 4\nThe answer is 3") == ("4", "hash")
    assert extract_answer("The answer is $\\frac{1}{2}$, since 1/2 = 0.5") == ("\\frac{1}{2}", "answer_colon")
    assert extract_answer("The answer is not obvious yet. Trying x = 4 works.") == ("4", "last_number")
    assert extract_answer("nothing numeric") == (None, "none")
    assert extract_answer(None) == (None, "none")
    assert extract_answer("x \\boxed{} y") == (None, "none")


def test_verdict_keys_and_errors():
    v = grade("\\boxed{1}", "1")
    assert set(v) == {"correct", "extracted", "stage", "how", "error"}
    with pytest.raises(ValueError, match="unknown task"):
        grade("1", "1", task="gsm9k")
    with pytest.raises(ValueError, match="missing"):
        grade("1", None)
    with pytest.raises(ValueError, match="choice letter"):
        grade("\\boxed{A}", "42", task="gpqa")


# ---------------------------------------------------------------------------------------------
# the pool
# ---------------------------------------------------------------------------------------------


def _hang_on_marker(job):
    if "HANG" in job[0]:
        while True:  # a busy loop, like sympy stuck in C code: only a kill stops it
            pass
    return job[0] == job[1]


@needs_mv
def test_grade_many_pool_matches_inline():
    rows = [{"response": r, "answer": a} for r, a, *_ in GSM8K_CASES + MATH_CASES + MV_CASES]
    t0 = time.monotonic()
    pooled = grade_many(rows, "math500", workers=2, timeout=10)
    assert time.monotonic() - t0 < 10
    inline = [grade(r["response"], r["answer"], "math500") for r in rows]
    assert [(v["correct"], v["stage"]) for v in pooled] == [(v["correct"], v["stage"]) for v in inline]
    assert sum(v["stage"] == "math_verify" for v in pooled) >= 5  # the symbolic stage really ran in the pool


def test_pool_kills_hung_items(monkeypatch):
    monkeypatch.setattr(grading, "_mv_job", _hang_on_marker)
    monkeypatch.setattr(grading, "_MV_STATE", {"checked": True, "ok": True})
    rows = [{"response": f"\\boxed{{a{i}}}", "answer": f"a{i}"} for i in range(3)]
    rows += [{"response": "\\boxed{b}", "answer": "c"}, {"response": "\\boxed{HANG}", "answer": "x"}]
    rows += [{"response": "\\boxed{z}", "answer": f"y{i}"} for i in range(3)]
    t0 = time.monotonic()
    v = grade_many(rows, "math500", workers=2, timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert [x["correct"] for x in v[:3]] == [True] * 3  # exact stage, never sent
    assert v[4]["correct"] is False and v[4]["stage"] == "none" and "timeout" in v[4]["error"]
    assert all(x["error"] is None for i, x in enumerate(v) if i != 4)  # the replacement worker went on
    assert summarize(v)["errors"] == 1


def test_run_pool_reports_exceptions():
    res = grading._run_pool(lambda j: j.upper() if j != "bad" else 1 / 0, {0: "a", 1: "bad", 2: "c"}, 2, 5)
    assert res[0] == ("A", None) and res[2] == ("C", None)
    assert res[1][0] is False and "ZeroDivisionError" in res[1][1]


def test_without_math_verify_warns_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify -> ImportError
    monkeypatch.setattr(grading, "_MV_STATE", {"checked": False, "ok": False})
    with pytest.warns(RuntimeWarning, match="math-verify is not installed"):
        v = grade_many([{"response": "\\boxed{\\sqrt{8}}", "answer": "2\\sqrt{2}"}], "math500")
    assert v[0]["stage"] == "none" and v[0]["error"] == "math-verify not installed"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        assert grade("\\boxed{1/2}", "0.5")["stage"] == "numeric"  # the fast stages still work
        grade("\\boxed{\\sqrt{8}}", "2\\sqrt{2}")


# ---------------------------------------------------------------------------------------------
# dreamtune grade
# ---------------------------------------------------------------------------------------------


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_grade_cli_writes_verdicts(tmp_path, capsys):
    rows = [
        {"question": "q1", "response": "so \\boxed{18}", "answer": "18"},
        {"question": "q2", "response": "The answer is 5", "answer": "6"},
        {"response": "no idea", "answer": 3, "extra": [1]},
    ]
    preds = _write(tmp_path / "preds.jsonl", rows)
    assert grade_cli.main(["--task", "gsm8k", "--predictions", str(preds), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "accuracy: 33.3% (1/3)" in out and "exact 1" in out and "none 2" in out
    graded = [json.loads(x) for x in (tmp_path / "preds.graded.jsonl").read_text().splitlines()]
    assert [g["correct"] for g in graded] == [True, False, False]
    assert graded[0]["question"] == "q1" and graded[2]["extra"] == [1]  # input rows kept
    assert graded[0]["extracted"] == "18" and graded[0]["stage"] == "exact"
    assert graded[2]["extracted"] is None
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away

    custom = tmp_path / "sub" / "v.jsonl"
    assert grade_cli.main(["--task", "generic", "--predictions", str(preds), "--out", str(custom)]) == 0
    assert len(custom.read_text().splitlines()) == 3


@pytest.mark.parametrize(
    "lines, match",
    [
        ([{"response": "1", "answer": "1"}, {"response": "2"}], r"preds.jsonl:2: row has no 'answer' field"),
        ([{"answer": "1"}], r"preds.jsonl:1: row has no 'response' field"),
        (["{not json"], r"preds.jsonl:1: not valid JSON"),
        (["[1, 2]"], r"expected a JSON object"),
        ([], r"has no rows"),
        ([{"response": "1", "answer": [1]}], r"row 1: the reference answer must be text or a number"),
    ],
)
def test_grade_cli_user_errors(tmp_path, lines, match):
    preds = _write(tmp_path / "preds.jsonl", lines)
    with pytest.raises(ValueError, match=match):
        grade_cli.main(["--task", "math500", "--predictions", str(preds), "--workers", "0"])


def test_grade_cli_errors_through_dreamtune(tmp_path, capsys):
    from dreamtune import cli

    assert cli.main(["grade", "--task", "gsm8k", "--predictions", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: predictions file not found")

    preds = _write(tmp_path / "p.jsonl", [{"response": "1"}])
    assert cli.main(["grade", "--task", "gsm8k", "--predictions", str(preds)]) == 2
    assert "no 'answer' field" in capsys.readouterr().err

    with pytest.raises(ValueError, match="overwrite"):
        grade_cli.main(["--task", "gsm8k", "--predictions", str(preds), "--out", str(preds)])
    with pytest.raises(ValueError, match="invalid choice"):  # argparse's mistakes become one error line
        grade_cli.main(["--task", "gsm9k", "--predictions", str(preds)])


@pytest.mark.parametrize("case, message", [
    ("dir", "predictions file PATH is a directory (pass a JSONL file"),
    ("bytes", "PATH is not UTF-8 text, so not JSONL; pass a JSONL file"),
    ("full", "the disk is full (No space left on device) while writing OUT; free some space"),
])
def test_grade_cli_unreadable_input_and_full_disk_are_one_line(tmp_path, capsys, monkeypatch, case, message):
    import errno

    from dreamtune import atomic, cli

    path, out = tmp_path / "p.jsonl", tmp_path / "verdicts.jsonl"
    if case == "dir":
        path.mkdir()
    elif case == "bytes":
        path.write_bytes(b'\xff\xfe{"response": "1", "answer": "1"}\n')
    else:
        _write(path, [{"response": "The answer is 1", "answer": "1"}])
        real = atomic.os.replace

        def replace(src, dst):  # the verdicts are written, then the disk runs out as the file is completed
            if str(dst) == str(out):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(src, dst)

        monkeypatch.setattr(atomic.os, "replace", replace)
    capsys.readouterr()
    code = cli.main(["grade", "--task", "gsm8k", "--predictions", str(path), "--out", str(out), "--workers", "0"])
    assert code == (1 if case == "full" else 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert message.replace("PATH", str(path)).replace("OUT", str(out)) in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@needs_mv
@pytest.mark.skipif(not (SHARED / "eval/math500/test.jsonl").is_file(), reason="shared MATH-500 test file absent")
def test_math500_reference_answers_score_100():
    from dreamtune import tasks

    rows = tasks.load("math500", SHARED / "eval")
    # the answer re-typeset without spaces, after a marker: normalisation must absorb the difference
    preds = [{"response": f"So the answer is ${r['answer'].replace(' ', '')}$.", "answer": r["answer"]} for r in rows]
    assert summarize(grade_many(preds, "math500", workers=2))["correct"] == 500
    assert summarize(grade_many([{"response": r["solution"], "answer": r["answer"]} for r in rows], "math500"))["correct"] == 500


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason=f"shared GSM8K test file absent ({GSM8K_TEST})")
def test_gsm8k_reference_solutions_score_100(tmp_path, capsys):
    refs = [json.loads(x) for x in GSM8K_TEST.read_text().splitlines() if x.strip()]
    assert len(refs) == 1319
    preds = _write(tmp_path / "gsm8k.jsonl", [{"question": r["question"], "response": r["answer"], "answer": r["answer"]} for r in refs])
    assert grade_cli.main(["--task", "gsm8k", "--predictions", str(preds)]) == 0
    assert "accuracy: 100.0% (1319/1319)" in capsys.readouterr().out
    # and against the bare final answers, as tasks.load gives them
    from dreamtune import tasks

    rows = tasks.load("gsm8k", SHARED / "eval")
    v = grade_many([{"response": r["solution"], "answer": r["answer"]} for r in rows], "gsm8k")
    assert summarize(v)["correct"] == 1319
