"""Where `dreamtune data validate` writes its report: where asked (--out), and never in place of a report
made with other settings (a what-if `--max-length 16` leaves the dataset's validation.json alone)."""

from __future__ import annotations

import json

from conftest import addition_rows
from dreamtune.cli import main as cli


def prepared(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(40)))
    d = tmp_path / "data"
    assert cli(["data", "prepare", "--input", str(src), "--format", "generic", "--out", str(d)]) == 0
    return d


def validate(capsys, d, tok, max_length, *extra) -> str:
    capsys.readouterr()
    assert cli(["data", "validate", "--data", str(d), "--tokenizer", str(tok), "--max-length", str(max_length),
                *map(str, extra)]) == 0
    return capsys.readouterr().out


def test_a_what_if_goes_beside_the_datasets_report(tmp_path, tiny_model_dir, capsys):
    d = prepared(tmp_path)
    out = validate(capsys, d, tiny_model_dir, 64)
    assert "note:" not in out
    own = (d / "validation.json").read_bytes()
    assert json.loads(own)["max_length"] == 64 and json.loads(own)["settings"]["max_length"] == 64

    out = validate(capsys, d, tiny_model_dir, 16)  # a what-if: the dataset's report stays as it was
    assert (d / "validation.json").read_bytes() == own
    side = d / "validation.max_length-16.json"
    report = json.loads(side.read_text())
    assert report["max_length"] == 16 and report["over_max_length"] > 0 and report["report"] == str(side)
    assert (d / "validation.max_length-16.png").exists() and report["histogram"].endswith("max_length-16.png")
    assert f"note: {d / 'validation.json'} holds the report of" in out and str(side) in out

    out = validate(capsys, d, tiny_model_dir, 64)  # the same settings again: measured again, in place
    assert "note:" not in out and json.loads((d / "validation.json").read_text())["max_length"] == 64


def test_out_is_where_the_report_goes_and_a_replacement_is_said(tmp_path, tiny_model_dir, capsys):
    d = prepared(tmp_path)
    validate(capsys, d, tiny_model_dir, 64)
    out = validate(capsys, d, tiny_model_dir, 16, "--out", tmp_path / "whatif" / "v16.json")
    assert "note:" not in out and json.loads((tmp_path / "whatif" / "v16.json").read_text())["max_length"] == 16
    assert json.loads((d / "validation.json").read_text())["max_length"] == 64
    out = validate(capsys, d, tiny_model_dir, 16, "--out", d / "validation.json")  # asked for: replaced, and said
    assert json.loads((d / "validation.json").read_text())["max_length"] == 16
    assert f"note: replaced {d / 'validation.json'}, which held a report of tokenizer" in out and "max_length 64" in out
