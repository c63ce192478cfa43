"""Answer extraction and grading for math benchmarks (and `dreamtune grade`).

Three steps for every (response, reference) pair:

1. `extract_answer(response)` finds the model's final answer, in this order of precedence:
   the last non-empty `\\boxed{}` / `\\fbox{}` / `\\framebox{}` (nested braces handled), the last
   `<answer>...</answer>`, the last GSM8K `#### N`, the last "Answer:" / "The (final) answer is",
   and as a fallback the last number in the text. It returns `(answer, how)`.
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

`grade()` grades one item in-process; `grade_many()` grades a list with the pool; `main()` is
`dreamtune grade`.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections import Counter, deque
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

from dreamtune.atomic import check_writable, write_jsonl

TASK_NAMES = ("gsm8k", "math500", "aime24", "aime25", "amc23", "gpqa", "generic")
HOWS = ("boxed", "answer_tag", "answer_colon", "hash", "last_number", "none")
STAGES = ("exact", "numeric", "math_verify", "none")
DEFAULT_TIMEOUT = 5.0

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

_BOX_CMD = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S | re.I)
_HASH = re.compile(r"####[ \t]*([^\n]*)")
# "Answer:", "Final Answer:", "The answer is", "the final answer is:", "**Answer:**", "answer = "
_ANSWER_COLON = re.compile(r"\banswer\b(?:\*\*)?[ \t]*(?::|\bis\b:?|=)[ \t]*(?:\*\*)?", re.I)
# A number: thousands-grouped, plain or decimal, optionally a simple fraction a/b. A minus sign
# counts only when not glued to a preceding word or digit ("5-3" is not "-3").
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:/\d+(?:\.\d+)?)?(?![\d])"
)
# inline math; an escaped dollar (\$5, a currency sign) neither opens nor closes it
_INLINE_MATH = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
_PROSE = re.compile(r"[A-Za-z',]+(?:\s+[A-Za-z',]+){2,}")  # three or more plain words, no math
_CHOICE = re.compile(r"^\(?([A-D])\)?(?:[.):]|\s|$)")
_CHOICE_IN_TEXT = re.compile(r"\(([A-D])\)|\b(?:option|choice)\s+\(?([A-D])\b|\b([A-D])\)", re.I)


def _boxed_contents(text: str) -> list[str]:
    """Every `\\boxed{...}` / `\\fbox{...}` / `\\framebox{...}` content, in order, braces balanced.

    An unclosed box (a truncated generation) is skipped; `\\boxed 5` (no braces) yields "5".
    Escaped braces `\\{ \\}` do not count towards nesting.
    """
    out = []
    for m in _BOX_CMD.finditer(text):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                c = text[j]
                if c == "\\":
                    j += 2
                    continue
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        out.append(text[i + 1 : j])
                        break
                j += 1
        elif i > m.end() and i < len(text):  # "\boxed 5": a space then one token
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                out.append(tok.group(0))
    return out


def _first_line(s: str) -> str:
    """The first non-empty line of s ("Answer:\\n18" puts the answer on the next line)."""
    for line in s.splitlines():
        if line.strip():
            return line
    return ""


def _refine(candidate: str) -> str:
    """Trim text found after a marker down to the answer itself.

    If it holds inline math (`$...$`), the first math segment is the answer ("The answer is $18$, since
    ..."); otherwise the text up to the end of the first sentence, without markdown bold.
    """
    s = candidate.strip().replace("**", "").strip()
    m = _INLINE_MATH.search(s)
    if m:
        return next(g for g in m.groups() if g is not None).strip()
    s = re.split(r"\.(?:\s|$)", s, maxsplit=1)[0]  # "18. She ..." -> "18"; "3.5" stays whole
    return s.strip().rstrip(".,;:").strip()


def _extract_choice(text: str) -> tuple[str | None, str]:
    """GPQA: a choice letter A-D from a marker, else the last "(C)" / "option C" / "C)" in the text."""
    for cand, how in _marker_candidates(text):
        c = _clean(cand)
        c = re.sub(r"^\\text\{(.*)\}$", r"\1", c).strip()
        m = _CHOICE.match(c)
        if m:
            return m.group(1), how
    hits = list(_CHOICE_IN_TEXT.finditer(text))
    if hits:
        return next(g for g in hits[-1].groups() if g).upper(), "last_number"
    return None, "none"


def _marker_candidates(text: str):
    """Answers found by explicit markers, in precedence order: boxed, answer tag, ####, "Answer:"."""
    boxes = [b for b in _boxed_contents(text) if b.strip()]
    if boxes:
        yield boxes[-1].strip(), "boxed"
    tags = [t for t in _ANSWER_TAG.findall(text) if t.strip()]
    if tags:
        inner = tags[-1].strip()
        sub = next(iter(_marker_candidates(inner)), None)  # "<answer>The answer is 18.</answer>"
        if sub is not None and sub[0]:
            yield sub[0], "answer_tag"
        elif len(inner) <= 40 or not _NUMBER.search(inner):
            yield _refine(inner), "answer_tag"
        else:  # a sentence ("She earns 18 dollars a day in total ..."): its last number
            yield _NUMBER.findall(inner)[-1], "answer_tag"
    hashes = [h for h in _HASH.findall(text) if h.strip()]
    if hashes:
        yield _refine(hashes[-1]), "hash"
    colons = list(_ANSWER_COLON.finditer(text))
    for m in reversed(colons):  # the last marker followed by an answer, not prose
        cand = _refine(_first_line(text[m.end() :]))
        # "the answer is not obvious yet" is reasoning; one- or two-word text answers ("Evelyn") stay
        if cand and not _PROSE.fullmatch(cand):
            yield cand, "answer_colon"
            break


def extract_answer(text: str | None, task: str | None = None) -> tuple[str | None, str]:
    """The final answer in a model response, and how it was found.

    Returns `(answer, how)`, how in HOWS. Precedence: the last non-empty `\\boxed{}`/`\\fbox{}`
    ("boxed"), the last `<answer>...</answer>` ("answer_tag"), the last `#### N` ("hash"), the last
    "Answer:" / "The answer is" ("answer_colon"), the last number ("last_number"); `(None, "none")`
    when nothing is found. With `task="gpqa"` the answer is a choice letter.
    """
    if not text:
        return None, "none"
    text = str(text)
    if task == "gpqa":
        return _extract_choice(text)
    for cand, how in _marker_candidates(text):
        if cand:
            return cand, how
    nums = _NUMBER.findall(text)
    if nums:
        return nums[-1], "last_number"
    return None, "none"


# ---------------------------------------------------------------------------------------------
# Normalisation and the fast stages
# ---------------------------------------------------------------------------------------------

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
# trailing unit words after a number ("18 dollars", "5 cm", "30 minutes"), but not math words
_UNIT_TAIL = re.compile(r"(?<=[\d}])\s+(?:(?!(?:pi|sqrt|inf|infty|infinity)\b)[A-Za-z]{2,}\.?(?:\s+|$))+$")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_LHS = re.compile(r"^[A-Za-z]\s*=\s*(?!=)(.+)$", re.S)


def _clean(s: str) -> str:
    """Light normalisation that keeps LaTeX parseable (what math-verify receives)."""
    s = str(s).strip()
    boxes = _boxed_contents(s)
    if boxes and s.startswith(("\\boxed", "\\fbox", "\\framebox")):
        s = boxes[-1]
    m = re.fullmatch(r"\$\$(.*)\$\$|\$(.*)\$|\\\((.*)\\\)|\\\[(.*)\\\]", s, re.S)
    if m:
        s = next(g for g in m.groups() if g is not None)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])\.?", "", s)
    # spacing commands, but not the second half of a "\\" row break followed by a space
    s = re.sub(r"\\displaystyle|(?<!\\)\\!", "", s)
    s = re.sub(r"(?<!\\)\\[,;: ]|\\q?quad(?![A-Za-z])|~", " ", s)
    # degrees and percent: dropped on both sides, so "50%" == "50" and "90^\circ" == "90"
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])", "", s)
    s = s.replace("\\%", "").replace("%", "")
    for _ in range(3):  # nested \text{\textbf{..}}
        s = _TEXT_CMD.sub(r"\1", s)
    s = s.replace("{,}", ",")
    s = s.strip().rstrip(".").strip()
    s = _UNIT_TAIL.sub("", s) if re.search(r"\d", s) else s  # "18 dollars" -> "18"; "Evelyn" stays
    s = re.sub(r"^(?:dollars?|usd)\s+", "", s, flags=re.I)
    return s.strip()


def _canonical_number(s: str) -> str:
    """'025' -> '25', '21.0' -> '21', '-0' -> '0', '1,000' -> '1000'; other strings unchanged."""
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _PLAIN_NUMBER.fullmatch(s):
        try:
            d = Decimal(s)
        except InvalidOperation:
            return s
        out = format(d.normalize(), "f")
        return "0" if out in ("-0", "+0") else out.lstrip("+")
    return s


def normalize_answer(s: str | None) -> str:
    """The string the exact stage compares: `_clean`, spaces removed, lower case, numbers canonical."""
    if s is None:
        return ""
    s = _clean(s)
    s = re.sub(r"\\sqrt\s*([0-9A-Za-z])", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\s+", "", s).lower()
    m = re.fullmatch(r"\(([a-e])\)", s)  # "(C)" -> "c"
    if m:
        s = m.group(1)
    return _canonical_number(s)


def _strip_lhs(s: str) -> str:
    """'x=5' -> '5' (a single-letter assignment), anything else unchanged."""
    m = _LHS.match(s)
    return m.group(1) if m else s


def _to_number(s: str) -> Fraction | None:
    """A normalised string as an exact number: integers, decimals, `a/b`, `\\frac{a}{b}`; else None."""
    s = _canonical_number(s)
    neg = s.startswith("-")
    body = s[1:] if neg else s
    m = re.fullmatch(r"\\frac\{([^{}]+)\}\{([^{}]+)\}", body) or re.fullmatch(r"([^/]+)/([^/]+)", body)
    try:
        if m:
            num, den = Fraction(_canonical_number(m.group(1))), Fraction(_canonical_number(m.group(2)))
            val = num / den
        elif _PLAIN_NUMBER.fullmatch(body):
            val = Fraction(body)
        else:
            return None
    except (ValueError, ZeroDivisionError):
        return None
    return -val if neg else val


def reference_answer(reference, task: str | None = None) -> str:
    """The reference as a string answer: numbers as text (27.0 -> '27'), the part after `####` of a
    GSM8K solution, the last `\\boxed{}` of a MATH solution, a choice letter for GPQA."""
    if reference is None:
        raise ValueError("the reference answer is missing (None)")
    if isinstance(reference, bool) or not isinstance(reference, (str, int, float)):
        raise ValueError(f"the reference answer must be text or a number, not {reference!r}")
    if isinstance(reference, float):
        if not math.isfinite(reference):
            raise ValueError(f"the reference answer is not a finite number: {reference!r}")
        return str(int(reference)) if reference.is_integer() else repr(reference)
    if isinstance(reference, int):
        return str(reference)
    ref = str(reference).strip()
    if "####" in ref:
        ref = ref.rsplit("####", 1)[1].strip()
    elif "\\boxed" in ref or "\\fbox" in ref:
        boxes = [b for b in _boxed_contents(ref) if b.strip()]
        if boxes:
            ref = boxes[-1].strip()
    if task == "gpqa":
        m = _CHOICE.match(_clean(ref).strip())
        if not m:
            raise ValueError(f"a GPQA reference answer must be a choice letter A-D, got {reference!r}")
        return m.group(1)
    return ref


def _fast_stages(pred: str, ref: str, task: str | None) -> tuple[str | None, bool]:
    """(stage, decided): the matching fast stage, or (None, True) when surely wrong, (None, False) when
    math-verify must decide."""
    if task == "gpqa":
        return ("exact" if pred.strip().upper() == ref.strip().upper() else None), True
    p, r = normalize_answer(pred), normalize_answer(ref)
    if p and (p == r or _strip_lhs(p) == _strip_lhs(r)):
        return "exact", True
    pn, rn = _to_number(_strip_lhs(p)), _to_number(_strip_lhs(r))
    if pn is not None and rn is not None:
        if pn == rn:
            return "numeric", True
        # two different integers are wrong; a decimal might be a rounding math-verify accepts
        if pn.denominator == 1 and rn.denominator == 1:
            return None, True
    return None, False


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


def _worker_main(conn, fn) -> None:
    """A pool worker: receives (index, job), answers (index, result, error); None stops it."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" chatter
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    except ValueError:
        pass
    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        idx, job = msg
        try:
            conn.send((idx, fn(job), None))
        except Exception as e:  # a bad item must not take the worker down
            conn.send((idx, False, f"{type(e).__name__}: {e}"[:300]))


def _run_pool(fn, jobs: dict[int, object], workers: int, timeout: float, start_timeout: float = 60.0):
    """Run fn(job) for every job in worker processes, each call limited to `timeout` seconds.

    Returns {index: (result, error)}: error is None, "timeout after Ns" (the worker was killed and
    replaced) or the exception text. Uses fork where available (fast start, no re-import of the
    caller's script); the workers only run pure-Python math, so forking a threaded parent is safe here.
    """
    assert workers >= 1 and timeout > 0
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    from multiprocessing.connection import wait

    pending = deque(jobs.items())
    results: dict[int, tuple[object, str | None]] = {}
    live: dict = {}  # conn -> {"proc", "job", "since", "ready"}

    def start():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, fn), daemon=True)
        proc.start()
        child.close()
        live[parent] = {"proc": proc, "job": None, "since": time.monotonic(), "ready": False}

    def retire(conn, grace: float = 0.0):
        st = live.pop(conn)
        st["proc"].join(grace)
        if st["proc"].is_alive():
            st["proc"].kill()
        st["proc"].join(1)
        conn.close()

    start_failures = 0
    for _ in range(min(workers, len(pending))):
        start()
    try:
        while pending or any(st["job"] is not None for st in live.values()):
            now = time.monotonic()
            for conn, st in live.items():
                if st["ready"] and st["job"] is None and pending:
                    st["job"] = pending.popleft()
                    st["since"] = now
                    conn.send(st["job"])
            if not live:
                start()
            limits = [st["since"] + (timeout if st["ready"] else start_timeout) for st in live.values()]
            for conn in wait(list(live), timeout=max(0.0, min(limits) - time.monotonic())):
                st = live[conn]
                try:
                    idx, res, err = conn.recv()
                except (EOFError, OSError):  # the worker died (out of memory, killed by the OS, ...)
                    if not st["ready"]:
                        start_failures += 1
                        if start_failures > 3:
                            raise RuntimeError("grading worker processes die on start; try --workers 0")
                    if st["job"] is not None:
                        results[st["job"][0]] = (False, "grading worker process died")
                    retire(conn)
                    continue
                if idx == "ready":
                    st["ready"] = True
                    continue
                assert st["job"] is not None and idx == st["job"][0]
                results[idx] = (res, err)
                st["job"] = None
            now = time.monotonic()
            for conn, st in list(live.items()):
                if st["job"] is not None and now - st["since"] > timeout:
                    results[st["job"][0]] = (False, f"timeout after {timeout:g}s")
                    retire(conn)  # the only way to stop C-level work in sympy/gmpy
                elif not st["ready"] and now - st["since"] > start_timeout:
                    raise RuntimeError(f"a grading worker did not start within {start_timeout:g}s")
            idle = sum(st["job"] is None for st in live.values())
            while pending and len(live) < workers and idle < len(pending):
                idle += 1
                start()  # replace killed or dead workers
    finally:
        for conn in list(live):
            try:
                conn.send(None)
            except OSError:
                pass
            retire(conn, grace=0.5)
    assert set(results) == set(jobs)
    return results


# ---------------------------------------------------------------------------------------------
# Public grading API
# ---------------------------------------------------------------------------------------------


def _check_task(task: str | None) -> str | None:
    if task is not None and task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASK_NAMES)}")
    return None if task == "generic" else task


def _verdict(extracted, how, stage, error=None) -> dict:
    return {"correct": stage != "none", "extracted": extracted, "stage": stage, "how": how, "error": error}


def grade(response: str | None, reference, task: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Grade one response against a reference answer, all in this process.

    Returns `{"correct", "extracted", "stage", "how", "error"}`: stage in STAGES is the one that matched
    ("none" when wrong), how in HOWS says how the answer was extracted. math-verify runs inline with its
    own signal-based timeout (in the main thread; elsewhere without a timeout) -- use `grade_many` for
    many items or untrusted text.
    """
    task = _check_task(task)
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


def read_predictions(path: str | Path) -> list[dict]:
    """Rows of a predictions JSONL; each needs `response` and `answer` (ValueError naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"predictions file not found: {path} (pass a JSONL file with 'response' and 'answer' per line)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object with 'response' and 'answer', got {type(row).__name__}")
            for key in ("response", "answer"):
                if key not in row or row[key] is None:
                    raise ValueError(
                        f"{path}:{n}: row has no '{key}' field; each row needs 'response' (the model's raw "
                        "output) and 'answer' (the reference answer)"
                    )
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows; expected JSON lines with 'response' and 'answer'")
    return rows


def default_out_path(predictions: str | Path) -> Path:
    """`preds.jsonl` -> `preds.graded.jsonl`, beside the input."""
    p = Path(predictions)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.stem
    return p.with_name(f"{stem}.graded.jsonl")


def main(argv: list[str] | None = None) -> int:
    from dreamtune.cli import parser

    ap = parser("dreamtune grade", "Grade generations made elsewhere: a JSONL with 'response' (raw model output) "
                "and 'answer' (reference) per line; 'question' optional.")
    ap.add_argument("--task", required=True, choices=TASK_NAMES, help="answer style (gpqa: choice letters)")
    ap.add_argument("--predictions", required=True, help="JSONL file of {response, answer[, question]}")
    ap.add_argument("--out", help="per-row verdicts JSONL (default: <predictions>.graded.jsonl beside it)")
    ap.add_argument("--workers", type=int, default=None, help="math-verify processes (0 = inline; default min(4, CPUs))")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per item for math-verify")
    args = ap.parse_args(argv)
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be 0 (inline) or more, got {args.workers}")
    out = Path(args.out) if args.out else default_out_path(args.predictions)
    if out.resolve() == Path(args.predictions).resolve():
        raise ValueError(f"--out {out} would overwrite the predictions file; choose another path")
    check_writable(out)
    rows = read_predictions(args.predictions)
    try:
        verdicts = grade_many(rows, args.task, workers=args.workers, timeout=args.timeout)
    except ValueError as e:  # a reference that cannot be read: say which file
        raise ValueError(f"{args.predictions}: {e}") from None
    graded = [{**row, **{k: v[k] for k in ("extracted", "correct", "stage", "how", "error")}} for row, v in zip(rows, verdicts)]
    write_jsonl(out, graded)
    print(format_summary(summarize(verdicts)))
    print(f"verdicts: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
