"""A file written by atomic_write_text is whole or unchanged: a write that fails (a full disk, a kill
between the two steps) leaves the old content and no temporary file behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from itmatch.config import load_config, save_config
from itmatch.files import atomic_write, atomic_write_text, read_problem, replace_folder, staging_folder


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_text(path, '{"best": 1}')
    real_write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        real_write_text(self, text[:4], *args, **kwargs)  # half of it reaches the temporary file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, '{"best": 2}')
    assert path.read_text() == '{"best": 1}' and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_every_writer_goes_through_the_same_rename(tmp_path):
    """Parquet tables, checkpoints and bytes use atomic_write too: a writer that dies halfway leaves
    the old file and no temporary."""
    path = tmp_path / "table.parquet"
    path.write_bytes(b"old")

    def dies_halfway(tmp: Path) -> None:
        tmp.write_bytes(b"PAR1 half a table")
        raise KeyboardInterrupt  # a kill, not only an OSError

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies_halfway)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["table.parquet"]


def test_a_saved_config_is_replaced_whole(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(load_config(None, ["train.epochs=3"]), path)
    save_config(load_config(None, ["train.epochs=5"]), path)
    assert load_config(path).train.epochs == 5 and len(list(tmp_path.iterdir())) == 1


def test_written_files_get_the_mode_open_would_give(tmp_path):
    """mkstemp makes its file 0600; a summary, a config or an evaluation's JSON must not be private."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_text(tmp_path / "a.json", "{}")
    (tmp_path / "b.json").write_text("{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 \
        == 0o666 & ~umask


def test_a_run_folder_that_is_a_file_or_cannot_be_created_is_named_before_anything_runs(tmp_path):
    """Both were tracebacks (FileExistsError, NotADirectoryError) after the data was prepared."""
    from itmatch.files import NotWritable, exclusive

    (tmp_path / "r-file").write_text("hi")
    with pytest.raises(NotWritable, match=r"r-file: a file, not run 'r-file''s folder"):
        with exclusive(tmp_path / "r-file", "run 'r-file'"):
            pass
    with pytest.raises(NotWritable, match=r"r-file/runs: cannot hold run 'x''s folder \(Not a directory"):
        with exclusive(tmp_path / "r-file" / "runs" / "x", "run 'x'"):
            pass
    with exclusive(tmp_path / "runs" / "x", "run 'x'"):  # a fresh place is created
        assert (tmp_path / "runs").is_dir()


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "weights.pt").write_text(text)
    return path


def test_a_folder_is_replaced_whole_and_a_crash_between_the_renames_keeps_the_old_one(tmp_path, monkeypatch):
    """Checkpoints of the same epoch and ensembles are swapped in by one helper: the new folder takes
    the name, nothing staged stays behind; a crash after the old one moved aside leaves it whole."""
    target = _folder(tmp_path / "best", "old")
    replace_folder(_folder(staging_folder(target), "new"), target)
    assert (target / "weights.pt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["best"]
    replace_folder(_folder(tmp_path / "staged", "first"), tmp_path / "fresh")  # nothing there before
    assert (tmp_path / "fresh" / "weights.pt").read_text() == "first"

    real_rename, calls = Path.rename, []

    def crash_on_second(self, new):
        calls.append(self)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real_rename(self, new)

    monkeypatch.setattr(Path, "rename", crash_on_second)
    with pytest.raises(OSError):
        replace_folder(_folder(staging_folder(target), "newer"), target)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".best.old-")]
    assert len(aside) == 1 and (aside[0] / "weights.pt").read_text() == "new"


def test_read_problem_is_one_line_with_yaml_s_place_or_the_os_reason(tmp_path):
    import yaml

    with pytest.raises(yaml.YAMLError) as info:
        yaml.safe_load("train:\n  epochs: [3\n")
    assert "\n" in str(info.value)  # PyYAML's own text: the problem, the place, the quoted line, a caret
    problem = read_problem(info.value)
    assert problem.startswith("line 3, column 1: not valid YAML: ") and "\n" not in problem, problem
    with pytest.raises(OSError) as info:
        (tmp_path / "missing.yaml").read_text()
    assert read_problem(info.value) == "No such file or directory"
    assert read_problem(ValueError("two\n  lines")) == "two lines"
    assert read_problem(ValueError()) == "ValueError"
