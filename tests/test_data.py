"""Tests of dreamtune.data: formats, split, manifest, validation numbers, and every bad input.

The s1K-1.1 fixture is built in-process from the real s1K questions and solutions in ../shared/data
(synthetic DeepSeek/Gemini traces and attempts); nothing is copied into the repository.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from dreamtune import cli
from dreamtune.data import (
    DEFAULT_SYSTEM_PROMPT,
    encode_example,
    encode_examples,
    read_rows,
    to_messages,
)
from dreamtune.data_prepare import prepare
from dreamtune.data_validate import answer_span, validate

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SYSTEM = {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"../shared/data not present: this test reads {p} (the data kept beside the repository)")
    return p


def write_parquet(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def s1k11_rows(n: int = 40) -> list[dict]:
    """Rows with s1K-1.1's columns: real questions and solutions, synthetic traces and attempts."""
    problems = json.loads(shared("s1k", "s1k_question_solution.json").read_text())[:n]
    rows = []
    for i, p in enumerate(problems):
        sol = p["solution"]
        half = len(sol) // 2
        attempt = f"{sol[-300:]}\n\nThe final answer is $\\boxed{{{i}}}$"
        if i % 5 == 0:
            attempt = f"Answer: {i}"  # already has "Answer:": s1 adds no prefix
        elif i % 7 == 3:
            attempt += ". This completes the argument."  # text after the answer
        rows.append({
            "question": p["problem"], "solution": sol, "cot_type": "math",
            "source_type": "AI-MO/NuminaMath-CoT/aops_forum", "metadata": json.dumps({"id": i}),
            "gemini_thinking_trajectory": f"Let me think about this.\n{sol[:300]}\nThat seems right.  ",
            "gemini_attempt": f"  {sol}  ",
            "deepseek_thinking_trajectory": (f"\nOkay, let's see. {p['problem'][:200]}\n\nHmm, {sol[:half]}\n\n"
                                             f"Wait, let me double-check that step.\n\n{sol[half:]}\n\nSo it is {i}.\n"),
            "deepseek_attempt": attempt,
            "gemini_grade": "Yes", "gemini_grade_reason": "matches", "deepseek_grade": "Yes",
            "deepseek_grade_reason": "matches",
        })
    return rows


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared("tokenizer-dream"))


@pytest.fixture
def s1k11(tmp_path) -> tuple[list[dict], Path]:
    rows = s1k11_rows()
    return rows, write_parquet(rows, tmp_path / "s1k11.parquet")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["data", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_fails(capsys, out_dir: Path, *argv, match: str) -> str:
    """The command exits 2 with one `error:` line containing `match`, and leaves no output."""
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}.*")), "a temporary directory was left behind"
    return err


# ---------------------------------------------------------------------------------------------------
# Formats: the exact text


@pytest.mark.parametrize("trace,layout", [("deepseek", "s1"), ("gemini", "plain"), ("deepseek", "plain"), ("none", "s1")])
def test_s1k11_text(s1k11, tmp_path, trace, layout):
    rows, path = s1k11
    prepare(str(path), str(tmp_path / "out"), "s1k-1.1", trace=trace, layout=layout, val_fraction=0.5)
    got = {r["source_index"]: r for r in read_rows(tmp_path / "out")}
    assert sorted(got) == list(range(len(rows)))
    for i in (0, 1, 3):
        row = rows[i]
        if trace == "none":
            want = row["solution"]
        else:
            thinking = row[f"{trace}_thinking_trajectory"].strip()
            attempt = row[f"{trace}_attempt"]
            answer = (attempt if i % 5 == 0 and trace == "deepseek" else "Answer: " + attempt).strip()
            want = (f"<|im_start|>think\n{thinking}\n<|im_start|>answer\n{answer}" if layout == "s1"
                    else f"{thinking}\n\n{answer}")
        assert got[i]["response"] == want
        assert got[i]["prompt"] == [SYSTEM, {"role": "user", "content": row["question"]}]
    if trace == "deepseek" and layout == "s1":  # s1's rule: no second "Answer: " when one is there
        assert got[0]["response"].endswith("\n<|im_start|>answer\nAnswer: 0")
        assert got[1]["response"].endswith("<|im_start|>answer\nAnswer: " + rows[1]["deepseek_attempt"].strip())


def test_s1k_original_text(tmp_path):
    rows = [{"question": r["question"], "solution": r["solution"], "attempt": r["gemini_attempt"],
             "thinking_trajectories": [r["gemini_thinking_trajectory"], "Second part."], "cot_type": "math"}
            for r in s1k11_rows(6)]
    prepare(str(write_parquet(rows, tmp_path / "s1k.parquet")), str(tmp_path / "out"), "s1k")
    got = {r["source_index"]: r["response"] for r in read_rows(tmp_path / "out")}
    thinking = (rows[2]["thinking_trajectories"][0] + "\nSecond part.").strip()
    answer = ("Answer: " + rows[2]["attempt"]).strip()  # s1's order: prefix, then strip
    assert got[2] == f"<|im_start|>think\n{thinking}\n<|im_start|>answer\n{answer}"


def test_gsm8k_text(tmp_path):
    src = shared("eval", "gsm8k", "train.jsonl")
    prepare(str(src), str(tmp_path / "out"), "gsm8k", limit=10, val_fraction=0.2)
    got = {r["source_index"]: r for r in read_rows(tmp_path / "out")}
    assert got[0]["response"] == ("Natalia sold 48/2 = 24 clips in May.\n"
                                  "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
                                  "The answer is \\boxed{72}.")
    assert got[0]["prompt"][1]["content"].startswith("Natalia sold clips to 48 of her friends")


def test_math_and_generic_text_and_system_prompts(tmp_path):
    rows = [{"problem": f"What is {i}+{i}?", "solution": f"It is $\\boxed{{{2 * i}}}$.", "answer": str(2 * i)}
            for i in range(5)]
    path = write_parquet(rows, tmp_path / "math.parquet")
    prepare(str(path), str(tmp_path / "m"), "math", system_prompt="Be brief.", val_fraction=0.2)
    got = {r["source_index"]: r for r in read_rows(tmp_path / "m")}
    assert got[3]["response"] == "It is $\\boxed{6}$."
    assert got[3]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3+3?"}]

    chats = [{"msgs": [{"role": "system", "content": "Own system."}, {"role": "user", "content": f"q{i}"}],
              "out": f"a{i}"} for i in range(4)] + [{"msgs": f"plain q{i}", "out": f"b{i}"} for i in range(4)]
    path = write_parquet(chats[:4], tmp_path / "chats.parquet")  # parquet: one type per column
    prepare(str(path), str(tmp_path / "g"), "generic", prompt_column="msgs", response_column="out", val_fraction=0.25)
    got = {r["source_index"]: r for r in read_rows(tmp_path / "g")}
    assert got[1]["prompt"] == chats[1]["msgs"] and got[1]["response"] == "a1"  # its own system message kept
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats[4:]))
    prepare(str(tmp_path / "plain.jsonl"), str(tmp_path / "n"), "generic", prompt_column="msgs",
            response_column="out", system_prompt=None, val_fraction=0.25)
    got = {r["source_index"]: r for r in read_rows(tmp_path / "n")}
    assert got[2]["prompt"] == [{"role": "user", "content": "plain q2"}] and got[2]["response"] == "b2"


# ---------------------------------------------------------------------------------------------------
# Split and manifest


def test_split_sizes_and_determinism(s1k11, tmp_path):
    _, path = s1k11

    def split(seed, name, fraction=0.1):
        prepare(str(path), str(tmp_path / name), "s1k-1.1", seed=seed, val_fraction=fraction)
        return ([r["source_index"] for r in read_rows(tmp_path / name / "train.parquet")],
                [r["source_index"] for r in read_rows(tmp_path / name / "val.parquet")])

    train, val = split(42, "a")
    assert (len(train), len(val)) == (36, 4)
    assert sorted(train + val) == list(range(40))
    assert split(42, "b") == (train, val)
    assert split(7, "c")[1] != val
    assert [len(s) for s in split(1, "d", 0.25)] == [30, 10]


def test_manifest(s1k11, tmp_path):
    _, path = s1k11
    m = prepare(str(path), str(tmp_path / "out"), "s1k-1.1", trace="gemini", layout="plain", seed=3,
                val_fraction=0.2, limit=30)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == m
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "train.parquet", "val.parquet"]
    assert m["format"] == "s1k-1.1" and m["input"] == str(path.resolve())
    assert m["input_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m["rows"] == {"input": 30, "train": 24, "val": 6, "dropped": 0}
    assert (m["seed"], m["val_fraction"], m["system_prompt"]) == (3, 0.2, DEFAULT_SYSTEM_PROMPT)
    assert m["settings"]["trace"] == "gemini" and m["settings"]["layout"] == "plain" and m["settings"]["limit"] == 30
    assert m["created"].startswith("20")


def test_dedupe(s1k11, tmp_path, capsys):
    rows, _ = s1k11
    path = write_parquet(rows[:10] + [rows[2], rows[5]], tmp_path / "dup.parquet")
    assert_fails(capsys, tmp_path / "out", "prepare", "--input", path, "--out", tmp_path / "out",
                 "--format", "s1k-1.1", match="2 duplicated rows")
    m = prepare(str(path), str(tmp_path / "out"), "s1k-1.1", dedupe=True, val_fraction=0.2)
    assert m["rows"] == {"input": 12, "train": 8, "val": 2, "dropped": 2}


def test_overwrite_replaces_whole(s1k11, tmp_path, capsys):
    _, path = s1k11
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "prepare", "--input", path, "--out", out, "--format", "s1k-1.1")
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    code, stdout, _ = run_cli(capsys, "prepare", "--input", path, "--out", out, "--format", "s1k-1.1", "--overwrite")
    assert code == 0 and "train 36, val 4" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.parquet", "val.parquet"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------------
# Reading and encoding


def test_read_rows_kinds(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "response": "yo", "n": 1}]
    write_parquet(rows, tmp_path / "a.parquet")
    got = read_rows(str(tmp_path / "a.parquet"))
    assert got == rows and type(got[0]["prompt"]) is list and type(got[0]["prompt"][0]) is dict
    (tmp_path / "b.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[0]) + "\n")
    (tmp_path / "c.json").write_text(json.dumps(rows))
    assert read_rows([str(tmp_path / "b.jsonl"), str(tmp_path / "c.json")]) == rows * 3
    assert read_rows(str(tmp_path)) == rows  # a directory: its parquet files
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_rows(str(tmp_path / "missing.parquet"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="cannot read .*bad.parquet as parquet"):
        read_rows(str(tmp_path / "bad.parquet"))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        read_rows(str(tmp_path / "bad.jsonl"))


def test_to_messages():
    assert to_messages("hi") == [{"role": "user", "content": "hi"}]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert to_messages(msgs) == msgs
    for bad in ("  ", [], [{"role": "user"}], [{"content": "x"}], 3, None):
        with pytest.raises(ValueError):
            to_messages(bad)


def test_encode_example_and_batched_agree(tok, s1k11):
    rows, _ = s1k11
    prompts = [[SYSTEM, {"role": "user", "content": r["question"]}] for r in rows[:12]] + ["a plain question"]
    responses = [r["deepseek_attempt"] for r in rows[:12]] + ["<|im_start|>think\nsé 日本 ∑\n<|im_start|>answer\nAnswer: 1"]
    one = [encode_example(tok, p, r) for p, r in zip(prompts, responses)]
    assert encode_examples(tok, prompts, responses) == one
    assert encode_example(tok, "q", "")[1] == [151643]  # an empty response is eos alone (prompt-only use)
    p_ids, r_ids = one[-1]
    assert r_ids[-1] == 151643 and r_ids[0] == 151644  # eos last; <|im_start|> is one special token
    assert tok.decode(p_ids).endswith("<|im_start|>user\na plain question<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|mask|>") == 151666


def test_encode_needs_a_chat_template(tok):
    saved = tok.chat_template
    tok.chat_template = None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            encode_example(tok, "q", "a")
        with pytest.raises(ValueError, match="no chat template"):
            encode_examples(tok, ["q"], ["a"])
    finally:
        tok.chat_template = saved


def test_answer_span():
    r = "think \\boxed{1} more\nAnswer: x = \\boxed{\\frac{1}{2}} so."
    s, e = answer_span(r)
    assert r[s:e] == "\\boxed{\\frac{1}{2}}"
    r = "steps\n#### 72\n"
    assert r[slice(*answer_span(r))] == "#### 72"
    r = "trace\nAnswer: the value is 5.  \n"
    assert r[slice(*answer_span(r))] == "Answer: the value is 5."
    assert answer_span("no marker here") is None


# ---------------------------------------------------------------------------------------------------
# Validation numbers against a direct count


def direct_answer_end(tok, response: str) -> int | None:
    """Token index of the final answer's last character, by offsets of a single-row encoding."""
    span = answer_span(response)
    if span is None:
        return None
    offsets = tok(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return next(t for t, (a, b) in enumerate(offsets) if a <= span[1] - 1 < b)


def test_validate_numbers(tok, s1k11, tmp_path):
    _, path = s1k11
    prepare(str(path), str(tmp_path / "d"), "s1k-1.1", val_fraction=0.25)
    rows = read_rows(tmp_path / "d" / "train.parquet") + read_rows(tmp_path / "d" / "val.parquet")
    enc = [encode_example(tok, r["prompt"], r["response"]) for r in rows]
    plen = np.array([len(p) for p, _ in enc])
    rlen = np.array([len(r) for _, r in enc])
    total = plen + rlen
    max_length = int(np.median(total))
    ends = [direct_answer_end(tok, r["response"]) for r in rows]
    lost = sum(e is not None and p + e >= max_length for e, p in zip(ends, plen))
    over = int((total > max_length).sum())
    assert 0 < lost <= over < len(rows)

    report = validate(str(tmp_path / "d"), tok, max_length)
    assert report["rows"] == 40 and report["splits"]["train"]["rows"] == 30
    for key, x in (("prompt", plen), ("response", rlen), ("total", total)):
        assert report[key] == {"min": x.min(), "median": np.median(x), "mean": x.mean(),
                               "p90": np.percentile(x, 90), "p99": np.percentile(x, 99), "max": x.max()}
    assert report["over_max_length"] == over
    assert report["answer_lost_right_truncation"] == lost
    assert report["splits"]["train"]["over_max_length"] + report["splits"]["val"]["over_max_length"] == over
    excess = np.maximum(total - max_length, 0)
    pol = report["policies"]
    assert pol["error"]["run_stops"] and pol["error"]["rows_over"] == over
    first = int(np.argmax(total > max_length))
    assert pol["error"]["first_row_over"] == {"split": "train", "row": first}
    assert pol["left"]["tokens_cut"] == excess.sum() == pol["right"]["tokens_cut"]
    assert pol["left"]["prompt_tokens_cut"] == np.minimum(excess, plen).sum()
    assert pol["left"]["rows_response_cut"] == (excess > plen).sum()
    assert pol["right"]["rows_losing_answer"] == lost and pol["right"]["rows_losing_eos"] == over
    assert pol["drop"] == {"rows_kept": 40 - over, "rows_dropped": over, "tokens_kept": total[total <= max_length].sum()}
    on_disk = json.loads((tmp_path / "d" / "validation.json").read_text())
    assert on_disk["answer_lost_right_truncation"] == lost and on_disk["max_length"] == max_length
    assert (tmp_path / "d" / "validation.png").read_bytes()[:4] == b"\x89PNG"


def test_answer_loss_boundary(tok, tmp_path):
    """A response ending in its answer loses it exactly when total - 2 >= max_length (the last token
    before eos is at position total - 2): a row one token over loses only its eos."""
    rows = [{"prompt": f"Question {i}?", "response": "Reasoning. " * i + f"The answer is \\boxed{{{i}}}"}
            for i in range(1, 9)]
    path = write_parquet(rows, tmp_path / "rows.parquet")
    totals = np.array([sum(map(len, encode_example(tok, r["prompt"], r["response"]))) for r in rows])
    k = len(rows) // 2
    for max_length in (totals[k] - 2, totals[k] - 1, totals[k]):  # row k loses its answer, its eos, nothing
        report = validate(str(path), tok, int(max_length), out=str(tmp_path / "v.json"))
        assert report["over_max_length"] == (totals > max_length).sum()
        assert report["answer_lost_right_truncation"] == (totals - 2 >= max_length).sum()
        assert report["rows_without_answer_marker"] == 0


def test_validate_cli_summary(capsys, tmp_path, monkeypatch):
    shared("tokenizer-dream")
    rows = [{"prompt": "What is 2+2?", "response": "2+2 = 4.\nAnswer: 4"}, {"prompt": "Hi?", "response": "Hello."}]
    (tmp_path / "theirs").mkdir()
    path = write_parquet(rows, tmp_path / "theirs" / "tiny.parquet")
    code, out, _ = run_cli(capsys, "validate", "--data", path, "--tokenizer", shared("tokenizer-dream"),
                           "--max-length", 2048, "--out", tmp_path / "report" / "v.json")
    assert code == 0
    assert "over max_length:" in out and "the run proceeds" in out and "1 rows have no answer marker" in out
    assert (tmp_path / "report" / "v.json").exists() and (tmp_path / "report" / "v.png").exists()
    # not a prepared DIR: the report goes to the current directory, never into the data's folder
    monkeypatch.chdir(tmp_path / "report")
    assert run_cli(capsys, "validate", "--data", path, "--tokenizer", shared("tokenizer-dream"), "--max-length", 9)[0] == 0
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["tiny.parquet"]
    assert json.loads((tmp_path / "report" / "tiny.validation.json").read_text())["over_max_length"] == 2


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def test_bad_inputs(s1k11, tmp_path, capsys):
    rows, path = s1k11
    out = tmp_path / "new" / "out"
    prep = ["prepare", "--out", out]
    # a likely mistake: response/answer columns that s1K-1.1 does not have
    err = assert_fails(capsys, out, *prep, "--input", path, "--format", "generic", "--prompt-column", "question",
                       "--response-column", "answer", match="column 'answer' not found")
    assert "deepseek_attempt" in err and "use --format s1k-1.1" in err
    assert_fails(capsys, out, *prep, "--input", path, "--format", "generic", match="column 'prompt' not found")
    assert_fails(capsys, out, *prep, "--input", path, "--format", "gsm8k", match="column 'answer' not found")
    assert_fails(capsys, out, *prep, "--input", path, "--format", "s1k-1.1", "--response-column", "response",
                 match="--response-column does not apply")
    assert_fails(capsys, out, *prep, "--input", path, "--format", "generic", "--prompt-column", "questoin",
                 "--response-column", "solution", match="did you mean 'question'?")
    assert_fails(capsys, out, *prep, "--input", path, "--format", "s1k", match="column 'thinking_trajectories'")
    assert_fails(capsys, out, *prep, "--input", path, "--format", "s1k", "--trace", "deepseek",
                 match="s1K's traces are Gemini's")
    # files
    assert_fails(capsys, out, *prep, "--input", tmp_path / "missing.parquet", "--format", "s1k-1.1",
                 match="no such file or directory")
    assert_fails(capsys, out, *prep, "--input", "simplescaling/s1K-1.1", "--format", "s1k-1.1",
                 match="dreamtune data download simplescaling/s1K-1.1")
    (tmp_path / "broken.parquet").write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert_fails(capsys, out, *prep, "--input", tmp_path / "broken.parquet", "--format", "s1k-1.1",
                 match="as parquet")
    # fields
    bad = [dict(r) for r in rows]
    bad[3]["deepseek_attempt"] = "   "
    assert_fails(capsys, out, *prep, "--input", write_parquet(bad, tmp_path / "empty.parquet"),
                 "--format", "s1k-1.1", match="row 3: column 'deepseek_attempt' is empty")
    (tmp_path / "types.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                  [{"prompt": "q", "response": "a"}, {"prompt": "q2", "response": 7}]))
    assert_fails(capsys, out, *prep, "--input", tmp_path / "types.jsonl", "--format", "generic",
                 match="row 1: column 'response' is of type int, not a string")
    (tmp_path / "gsm.jsonl").write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    assert_fails(capsys, out, *prep, "--input", tmp_path / "gsm.jsonl", "--format", "gsm8k",
                 match="row 0: a gsm8k answer must end with a '#### N' line")
    # settings
    for fraction in ("0", "1", "1.5", "-0.1"):
        assert_fails(capsys, out, *prep, "--input", path, "--format", "s1k-1.1", "--val-fraction", fraction,
                     match="--val-fraction must lie strictly between 0 and 1")
    assert_fails(capsys, out, *prep, "--input", path, "--format", "s1k-1.1", "--val-fraction", "abc",
                 match="invalid float value")
    assert_fails(capsys, out, *prep, "--input", path, "--format", "s1k-1.2", match="invalid choice")
    assert_fails(capsys, out, *prep, "--input", path, "--format", "gsm8k", "--trace", "gemini",
                 match="--trace and --layout apply to")
    assert_fails(capsys, out, *prep, "--input", path, "--format", "s1k-1.1", "--limit", "1",
                 match="need at least 2 rows")


def test_validate_and_download_bad_inputs(tmp_path, capsys):
    out = tmp_path / "out"
    assert_fails(capsys, out, "validate", "--data", out, "--tokenizer", "x", "--max-length", 10,
                 match="no such file or directory")
    rows = [{"prompt": "q", "answer": "a"}]
    path = write_parquet(rows, tmp_path / "r.parquet")
    assert_fails(capsys, out, "validate", "--data", path, "--tokenizer", "x", "--max-length", 10,
                 match="column 'response' not found")
    write_parquet([{"prompt": "q", "response": "a"}], out.parent / "ok.parquet")
    assert_fails(capsys, out, "validate", "--data", out.parent / "ok.parquet", "--tokenizer", tmp_path / "no-tok",
                 "--max-length", 10, match="no-tok' does not exist")
    assert_fails(capsys, out, "download", tmp_path / "missing.jsonl", "--out", out, match="no such file")
    # a hub id without a network fails fast, pointing at local files (with one, it does not exist)
    err = assert_fails(capsys, out, "download", "dreamtune-tests/no-such-dataset", "--out", out,
                       match="could not load 'dreamtune-tests/no-such-dataset'")
    assert "pass a local parquet, jsonl or json file" in err


def test_jsonl_strings_may_hold_line_separators(tmp_path, capsys):
    """U+2028 and U+0085 are valid unescaped in a JSON string (json.dumps(ensure_ascii=False) writes them so):
    such a row is one row, not a broken line."""
    rows = [{"prompt": "a\u2028b", "response": "c\u0085d"}, {"prompt": "e", "response": "f"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_rows(path) == rows
    code, _, err = run_cli(capsys, "prepare", "--input", path, "--format", "generic", "--out", tmp_path / "out")
    assert code == 0, err


def full_disk_for_parquet(monkeypatch):
    """pyarrow's parquet writer fails as on a full disk (the OSError it raises there: errno 28, no file name)."""
    import errno

    import pyarrow.parquet as pq

    def no_room(table, where, *a, **kw):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq, "write_table", no_room)


@pytest.mark.parametrize("verb", ["download", "prepare"])
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(verb, tmp_path, capsys, monkeypatch):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "1+1?", "response": "2"}\n{"prompt": "2+2?", "response": "4"}\n')
    out = tmp_path / "new" / "out"
    full_disk_for_parquet(monkeypatch)
    argv = [verb, path, "--out", out] if verb == "download" else [verb, "--input", path, "--format", "generic", "--out", out]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("error: the disk is full (No space left on device) while writing ") and str(out) in err, err
    assert "free some space" in err and ".tmp-" not in err, err
    assert not out.exists() and not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_a_read_only_output_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """A read-only filesystem (simulated: as root, chmod does not stop writes) refuses the temporary file or
    directory; the error names the output, not the temporary name."""
    import errno
    import tempfile

    def read_only(*a, dir=None, **kw):
        raise OSError(errno.EROFS, "Read-only file system", f"{dir}/.out.tmp-abc")

    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "1+1?", "response": "2"}\n{"prompt": "2+2?", "response": "4"}\n')
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "download", path, "--out", out)
    assert code == 2 and err == f"error: Read-only file system: {out / 'train.parquet'}; choose another path\n", err
    code, _, err = run_cli(capsys, "prepare", "--input", path, "--format", "generic", "--out", out)
    assert code == 2 and err == f"error: Read-only file system: {out}; choose another path\n", err
    assert not [p for p in tmp_path.rglob("*") if p.name not in ("rows.jsonl", "out")]


def test_download_local(s1k11, tmp_path, capsys):
    rows, path = s1k11
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = run_cli(capsys, "download", tmp_path / "src", "--out", tmp_path / "raw")
    assert code == 0 and "wrote" in out
    assert read_rows(tmp_path / "raw" / "train.parquet") == rows
    code, _, err = run_cli(capsys, "download", path, "--out", tmp_path / "raw")
    assert code == 2 and "--overwrite" in err
    assert run_cli(capsys, "download", path, "--out", tmp_path / "raw", "--split", "val")[0] == 0
    assert read_rows(tmp_path / "raw" / "val.parquet") == rows


def test_prepare_gsm8k_train_for_the_trainer(tok, tmp_path, capsys):
    src = shared("eval", "gsm8k", "train.jsonl")
    code, out, _ = run_cli(capsys, "prepare", "--input", src, "--out", tmp_path / "gsm8k", "--format", "gsm8k")
    assert code == 0 and "train 6726, val 747" in out
    from dreamtune.rows import check_columns

    for split, n in (("train", 6726), ("val", 747)):
        rows = read_rows(str(tmp_path / "gsm8k" / f"{split}.parquet"))
        assert len(rows) == n
        check_columns(rows, "prompt", "response")
        assert all(isinstance(r["response"], str) and r["response"] for r in rows)
        assert all(isinstance(m["content"], str) for r in rows for m in r["prompt"])
    ids = encode_examples(tok, [r["prompt"] for r in rows[:8]], [r["response"] for r in rows[:8]])
    assert all(r[-1] == tok.eos_token_id for _, r in ids)
