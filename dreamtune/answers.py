"""Finding a model's final answer in its text, and normalising answers for comparison.

`extract_answer(text)` returns `(answer, how)`; `normalize_answer` and `_fast_stages` are the grader's
in-process comparison stages (exact, numeric). `dreamtune.grading` builds the verdicts on top of these
and re-exports the public names; docs/grading.md gives the rules and the reasons for them.

Models write boxes malformed. When no well-formed box is found, three repairs are tried, each reported
with its own `how` so that a grade says which rule read the answer:
  boxed_unclosed      `\\boxed{78</answer>`: the box's closing brace is missing, but the answer tag closes
                      right after it on the same line (a box cut at the end of the text stays unread: a
                      truncated `\\boxed{78` may have been `\\boxed{789}`);
  boxed_no_backslash  `boxed{27}`: the command without its backslash, as a word of its own;
  boxed_after_empty   `\\boxed{}32`: an empty box with the answer written right after it, the rest of the
                      line empty (`\\boxed{}1. First, ...` is an echoed instruction and a numbered list).
A repaired box's content is graded as written: `\\boxed{78 + 5</answer>` is "78 + 5", not 78.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

HOWS = ("boxed", "boxed_unclosed", "boxed_no_backslash", "boxed_after_empty", "answer_tag", "answer_colon",
        "hash", "last_number", "none")

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


_TAG_END = "</answer>"
_BARE_BOX = re.compile(r"(?<![\\A-Za-z])boxed[ \t]*(?=\{)")  # "boxed{27}", not "\\boxed{" nor "unboxed{"
_EMPTY_THEN = re.compile(  # "\\boxed{}32", "$\\boxed{}$ 32.": a number, then nothing more on its line
    r"\\boxed[ \t]*\{[ \t]*\}[ \t]*\$?[ \t]*(?P<ans>-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)[ \t]*\$?\.?[ \t]*"
    r"(?=\n|$|</answer>)", re.I)


def _balanced(text: str, i: int) -> tuple[str | None, int, int]:
    """(content, open braces, stop) for the brace group opening at text[i]. content is None when the
    group is not closed before the end of the text or an `</answer>` (where it stops: `stop`); a
    content that holds `</answer>` is never an answer. Escaped braces `\\{ \\}` do not count."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "<" and text[j:j + len(_TAG_END)].lower() == _TAG_END:
            break
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j], 0, j
        j += 1
    return None, depth, min(j, len(text))


def _box_groups(text: str):
    """(match, index of the box's opening brace or None) for every `\\boxed` / `\\fbox` / `\\framebox`."""
    for m in _BOX_CMD.finditer(text):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        yield m, (i if i < len(text) and text[i] == "{" else None), i


def _boxed_contents(text: str) -> list[str]:
    """Every well-formed `\\boxed{...}` / `\\fbox{...}` / `\\framebox{...}` content, in order, braces
    balanced. An unclosed box (a truncated generation, or one an `</answer>` interrupts) is skipped here
    (`_repaired_boxes` may read it); `\\boxed 5` (no braces) yields "5"."""
    out = []
    for m, brace, i in _box_groups(text):
        if brace is not None:
            content, _, _ = _balanced(text, brace)
            if content is not None:
                out.append(content)
        elif i > m.end() and i < len(text):  # "\boxed 5": a space then one token
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                out.append(tok.group(0))
    return out


def _repaired_boxes(text: str) -> list[tuple[int, str, str]]:
    """Malformed boxes read anyway (the module docstring's three rules): [(position, content, how)]."""
    found = []
    for m, brace, _ in _box_groups(text):
        if brace is None:
            continue
        content, depth, stop = _balanced(text, brace)
        # only the box's own closing brace is missing, and an answer tag (not the text's end) cut it
        if content is None and depth == 1 and text[stop:stop + len(_TAG_END)].lower() == _TAG_END:
            body = text[brace + 1:stop].strip()
            if body and "\n" not in body:
                found.append((m.start(), body, "boxed_unclosed"))
    for m in _BARE_BOX.finditer(text):
        content, _, _ = _balanced(text, m.end())
        if content is not None and content.strip():
            found.append((m.start(), content.strip(), "boxed_no_backslash"))
    for m in _EMPTY_THEN.finditer(text):
        found.append((m.start(), m.group("ans"), "boxed_after_empty"))
    return sorted(found)


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
    repaired = _repaired_boxes(text)  # only reached when no well-formed box gave an answer
    if repaired:
        yield repaired[-1][1], repaired[-1][2]
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
    ("boxed"), the last repaired malformed box ("boxed_unclosed", "boxed_no_backslash",
    "boxed_after_empty"; the module docstring), the last `<answer>...</answer>` ("answer_tag"), the last `#### N` ("hash"), the last
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

