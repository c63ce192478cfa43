"""Answer extraction and grading for math benchmarks (and `dreamtune grade`).

Three steps for every (response, reference) pair:

1. `extract_answer(response)` finds the model's final answer, in this order of precedence:
   the last non-empty `\\boxed{}` / `\\fbox{}` / `\\framebox{}` (nested braces handled), a malformed
   box read by one of three repairs (`\\boxed{78</answer>`, `boxed{27}`, `\\boxed{}32`), the last
   `<answer>...</answer>`, the last GSM8K `#### N`, the last "Answer:" / "The (final) answer is",
   and as a fallback the last number in the text. It returns `(answer, how)`; `how` names the rule.
2. Normalised exact match (`stage="exact"`): both sides go through `normalize_answer` (math delimiters,
   `\\text{}`, units words, thousands commas, `\\dfrac`, `\\left`/`\\right`, degrees, percent signs,
   spaces, leading zeros, `21.0` -> `21`), then a numeric comparison (`stage="numeric"`) of plain
   numbers and simple fractions (`1/2`, `\\frac{1}{2}`, `0.5`).
3. Symbolic equivalence with math-verify (`stage="math_verify"`): roots, pi, intervals, sets, tuples,
   expressions. math-verify can hang on adversarial input, so `grade_many` runs this stage in worker
   processes with a hard per-item timeout (a stuck worker is killed and replaced); a timeout grades
   the item wrong with `error` set. Without math-verify installed the stage is skipped (one warning).

Policies (docs/grading.md explains why): several boxed answers -> the last one wins; "50%" equals
"50" but not "0.5" (the percent sign is dropped on both sides before comparing); trailing unit words
("18 dollars", "5 cm") are dropped; "025" equals "25"; an integer reference and an integer answer that
differ are wrong without consulting math-verify. For `task="gpqa"` the answer is a choice letter A-D.

`grade()` grades one item in-process; `grade_many()` grades a list with the pool; the verb
`dreamtune grade` is dreamtune/grade_cli.py. Extraction and normalisation live in `dreamtune.answers`, the worker pool in
`dreamtune.grading_pool`; the names are re-exported here.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections import Counter

from dreamtune.answers import (  # noqa: F401  (re-exported: extraction and normalisation live there)
    HOWS,
    _boxed_contents,
    _clean,
    _fast_stages,
    _repaired_boxes,
    _to_number,
    extract_answer,
    normalize_answer,
    reference_answer,
)
from dreamtune.grading_pool import _run_pool, _worker_main  # noqa: F401  (re-exported)
from dreamtune.tasks import SYNTHETIC_TASKS, TASKS
from dreamtune.tasks.synthetic import final_answer, grade_synthetic

TASK_NAMES = (*TASKS, "generic")  # the task registry's names; generic: any reference, no task's rules
STAGES = ("exact", "numeric", "math_verify", "none")
DEFAULT_TIMEOUT = 5.0


# ---------------------------------------------------------------------------------------------
# math-verify, in-process and in a pool with hard timeouts
# ---------------------------------------------------------------------------------------------

_MV_STATE = {"checked": False, "ok": False}


def _math_verify_available() -> bool:
    """Whether math-verify imports; warns once (per process) when it does not."""
    if not _MV_STATE["checked"]:
        _MV_STATE["checked"] = True
        try:
            import math_verify  # noqa: F401

            _MV_STATE["ok"] = True
        except ImportError:
            warnings.warn(
                "math-verify is not installed: the symbolic grading stage is skipped (answers equal only "
                "up to fractions/roots/sets/intervals are graded wrong); install it with: "
                "pip install 'dreamtune[eval]'",
                RuntimeWarning,
                stacklevel=3,
            )
    return _MV_STATE["ok"]


def _mv_equal(pred: str, ref: str, timeout_s: int | None) -> bool:
    """math-verify's verdict on two cleaned answers (gold first: verify is not symmetric)."""
    from math_verify import parse, verify

    gold = parse(f"${_clean(ref)}$", parsing_timeout=timeout_s)
    target = parse(f"${_clean(pred)}$", parsing_timeout=timeout_s)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=timeout_s))


def _mv_job(job: tuple[str, str]) -> bool:
    """One pool job: the worker is killed from outside on timeout, so math-verify's own signal
    timeouts are off here (they cannot interrupt C code anyway)."""
    return _mv_equal(job[0], job[1], None)



# ---------------------------------------------------------------------------------------------
# Public grading API
# ---------------------------------------------------------------------------------------------


def _check_task(task: str | None) -> str | None:
    if task is not None and task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASK_NAMES)}")
    return None if task == "generic" else task


def _verdict(extracted, how, stage, error=None) -> dict:
    return {"correct": stage != "none", "extracted": extracted, "stage": stage, "how": how, "error": error}


def _synthetic_verdict(response: str | None, reference, task: str) -> dict:
    """A synthetic task's exact grade: its Answer line equals the reference (dreamtune.tasks.synthetic)."""
    correct = grade_synthetic(task, response or "", reference)
    return _verdict(final_answer(response or ""), "answer_colon", "exact" if correct else "none")


def grade(response: str | None, reference, task: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Grade one response against a reference answer, all in this process.

    Returns `{"correct", "extracted", "stage", "how", "error"}`: stage in STAGES is the one that matched
    ("none" when wrong), how in HOWS says how the answer was extracted. math-verify runs inline with its
    own signal-based timeout (in the main thread; elsewhere without a timeout) -- use `grade_many` for
    many items or untrusted text.
    """
    task = _check_task(task)
    if task in SYNTHETIC_TASKS:
        return _synthetic_verdict(response, reference, task)
    ref = reference_answer(reference, task)
    extracted, how = extract_answer(response, task)
    if extracted is None:
        return _verdict(None, how, "none")
    stage, decided = _fast_stages(extracted, ref, task)
    if decided:
        return _verdict(extracted, how, stage or "none")
    if not _math_verify_available():
        return _verdict(extracted, how, "none", "math-verify not installed")
    in_main = threading.current_thread() is threading.main_thread()
    try:
        ok = _mv_equal(extracted, ref, max(1, math.ceil(timeout)) if in_main else None)
    except Exception as e:  # math-verify raises on odd input only with raise_on_error; be safe anyway
        return _verdict(extracted, how, "none", f"{type(e).__name__}: {e}"[:300])
    return _verdict(extracted, how, "math_verify" if ok else "none")


def grade_many(
    rows: list[dict],
    task: str | None = None,
    workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[dict]:
    """Grade rows `{"response", "answer"}`; returns one verdict per row (see `grade`), in order.

    Extraction and the exact/numeric stages run here; only undecided items go to `workers` processes
    (default: up to 4, at most the CPU count) for math-verify, each with a hard `timeout` in seconds.
    `workers=0` runs math-verify inline instead (no hard timeout). A timed-out item is graded wrong
    with `error="timeout after Ns"`.
    """
    task = _check_task(task)
    if timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {timeout}")
    verdicts: list[dict | None] = [None] * len(rows)
    todo: dict[int, tuple[str, str]] = {}
    for i, row in enumerate(rows):
        for key in ("response", "answer"):
            if key not in row:
                raise ValueError(f"row {i + 1} has no '{key}' field")
        if task in SYNTHETIC_TASKS:  # exact: never math-verify
            verdicts[i] = _synthetic_verdict(row["response"], row["answer"], task)
            continue
        try:
            ref = reference_answer(row["answer"], task)
        except ValueError as e:
            raise ValueError(f"row {i + 1}: {e}") from None
        extracted, how = extract_answer(row["response"], task)
        if extracted is None:
            verdicts[i] = _verdict(None, how, "none")
            continue
        stage, decided = _fast_stages(extracted, ref, task)
        if decided:
            verdicts[i] = _verdict(extracted, how, stage or "none")
        else:
            verdicts[i] = _verdict(extracted, how, "none")
            todo[i] = (extracted, ref)
    if todo and not _math_verify_available():
        for i in todo:
            verdicts[i]["error"] = "math-verify not installed"
        todo = {}
    if todo:
        if workers is None:
            workers = min(4, os.cpu_count() or 1)
        if workers < 0:
            raise ValueError(f"--workers must be 0 (inline) or more, got {workers}")
        if workers == 0:
            for i, (pred, ref) in todo.items():
                verdicts[i] = grade(rows[i]["response"], rows[i]["answer"], task, timeout)
        else:
            for i, (ok, err) in _run_pool(_mv_job, todo, workers, timeout).items():
                verdicts[i]["stage"] = "math_verify" if ok else "none"
                verdicts[i]["correct"] = bool(ok)
                verdicts[i]["error"] = err
    assert all(v is not None for v in verdicts)
    return verdicts  # type: ignore[return-value]


def summarize(verdicts: list[dict]) -> dict:
    """`{"accuracy" (0..1), "correct", "total", "by_stage": {stage: n}, "no_answer", "errors"}`."""
    total = len(verdicts)
    correct = sum(bool(v["correct"]) for v in verdicts)
    by_stage = Counter(v["stage"] for v in verdicts)
    return {
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "by_stage": {s: by_stage.get(s, 0) for s in STAGES},
        "no_answer": sum(v["how"] == "none" for v in verdicts),
        "errors": sum(bool(v.get("error")) for v in verdicts),
    }


def format_rules(verdicts: list[dict]) -> str:
    """`answers found by: boxed 800, boxed_unclosed 3, ...`: how many answers each extraction rule read."""
    by_how = Counter(v["how"] for v in verdicts)
    return "answers found by: " + (", ".join(f"{h} {by_how[h]}" for h in HOWS if h != "none" and by_how[h]) or "nothing")


def format_summary(summary: dict) -> str:
    """`accuracy: 76.4% (863/1130)` and a line of per-stage counts."""
    s = summary
    lines = [f"accuracy: {100 * s['accuracy']:.1f}% ({s['correct']}/{s['total']})"]
    lines.append("by stage: " + ", ".join(f"{k} {v}" for k, v in s["by_stage"].items()))
    lines.append(f"no answer found: {s['no_answer']}; errors/timeouts: {s['errors']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `dreamtune grade`
# ---------------------------------------------------------------------------------------------
