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


def test_doctor_flags_an_out_dir_no_run_can_be_written_to(capsys, tmp_path, monkeypatch):
    """A file where the runs' directory would be, or a read-only one (simulated: as root, chmod does not stop
    writes): one error line naming it, exit 1; a directory that does not exist yet is fine."""
    import dreamtune.doctor as doctor

    (tmp_path / "afile").write_text("")
    capsys.readouterr()
    assert cli(["doctor", "--out-dir", str(tmp_path / "afile" / "runs")]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: --out-dir {tmp_path / 'afile' / 'runs'}: {tmp_path / 'afile'} is a file, so no run can be "
                   f"written there; choose another --out-dir\n"), err

    real = doctor.os.access
    monkeypatch.setattr(doctor.os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    assert cli(["doctor", "--out-dir", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path} is not writable (a read-only filesystem or no permission)" in err, err
    monkeypatch.undo()
    assert cli(["doctor", "--out-dir", str(tmp_path / "new" / "runs")]) == 0
