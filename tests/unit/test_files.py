"""A file written by atomic_write_text is whole or unchanged: a write that fails (a full disk, a kill
between the two steps) leaves the old content and no temporary file behind."""

from __future__ import annotations

import pytest

from itmatch.config import load_config, save_config
from itmatch.files import atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_text(path, '{"best": 1}')
    real_open = open

    def full_disk(fd, *args, **kwargs):
        handle = real_open(fd, *args, **kwargs)

        def write(_text):
            handle.__class__.write(handle, '{"be')  # half of it reaches the temporary file
            raise OSError(28, "No space left on device")

        handle.write = write
        return handle

    monkeypatch.setattr("itmatch.files.os.fdopen", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, '{"best": 2}')
    assert path.read_text() == '{"best": 1}' and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_saved_config_is_replaced_whole(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(load_config(None, ["train.epochs=3"]), path)
    save_config(load_config(None, ["train.epochs=5"]), path)
    assert load_config(path).train.epochs == 5 and len(list(tmp_path.iterdir())) == 1
