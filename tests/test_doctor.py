"""`dreamtune doctor` runs and reports the environment a run depends on: Python, torch, transformers, CUDA,
free disk and the optional extras."""

from dreamtune.cli import main as cli
from dreamtune.doctor import _older


def test_doctor_reports_and_exits_zero(capsys, tmp_path):
    assert cli(["doctor", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for key in ["python", "torch", "transformers", "cuda", "disk free", "extra [lora]"]:
        assert key in out


def test_version_compare():
    assert _older("2.5.1", "2.6") and not _older("2.13.0+cpu", "2.6") and not _older("5.17.0", "5.17")
    assert _older("4.46.2", "5.17")
