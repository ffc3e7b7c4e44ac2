"""The ablation table's planning and arithmetic (no Ray): rows checked before anything runs, one job
per (row, seed), mean ± sample std per row against a by-hand computation, differences to the first
row flagged when they exceed the seeds' spread."""

from __future__ import annotations

import math
import re

import pytest

from itmatch.config import ConfigError
from tuning.ablation import RECALLS, load_table, markdown, plan, summarize


def _table(tmp_path, text):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return path


def test_rows_are_checked_before_anything_runs(tmp_path):
    path = _table(tmp_path, "config: configs/debug.yaml\nseeds: [0, 1]\nrows:\n  ok: {}\n  bad: {loss.margn: 0.1}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: row 'bad'.*loss\.margn"):
        load_table(path, [])
    with pytest.raises(ConfigError, match="seeds"):
        load_table(_table(tmp_path, "seeds: [a]\nrows: {x: {}}\n"), [])
    with pytest.raises(ConfigError, match="rows"):
        load_table(_table(tmp_path, "rows: [1, 2]\n"), [])


@pytest.mark.parametrize("text, needle", [
    ("seed: [0, 1]\nrows: {x: {}}\n", "unknown key 'seed'"),  # would have run the default seed only
    ("seeds: [0, 0]\nrows: {x: {}}\n", "repeats a seed"),  # two runs in one folder
    ("seeds: [true]\nrows: {x: {}}\n", "seeds: expected a list of integers"),
    ("rows: {Full model: {}, full-model: {loss.top_k: 1}}\n", "rows 'Full model' and 'full-model' would share"),
    ("overrides: [train.epochs=1]\nrows: {x: {}}\n", "overrides: expected a mapping"),
    ("seeds: [-1]\nrows: {x: {}}\n", "seeds: expected a list of integers 0 .. 2**31-1"),
    # set for every run by the table: the row's value was dropped, its table line still showed it
    ("rows: {x: {}, y: {train.seed: 5}}\n", "row 'y': train.seed is set by the table"),
    ("rows: {x: {run.name: mine}}\n", "row 'x': run.name is set by the table"),
    ("overrides: {train.seed: 3}\nrows: {x: {}}\n", "overrides: train.seed is set by seeds:"),
    # every row trains on the data prepared once for the preset: these trained on it under their own name
    ("rows: {x: {}, y: {data.source: 'precomp:/elsewhere'}}\n", "row 'y': data.source='precomp:/elsewhere' needs other data"),
    ("rows: {x: {}, y: {data.text_encoder: hashing}}\n", "row 'y': data.text_encoder='hashing' needs other data"),
    ("rows: {x: {}, y: {model.image_tower: efficientnet_lite0, model.text_tower: minilm}}\n",
     "model.image_tower='efficientnet_lite0' needs other data than the 'features'"),
    ("rows: {x: {}, y: {data.val_split: test}}\n", None),  # a split the preset prepares already: fine
    ("rows: {x: {}, y: {data.train_split: 'train+restval'}}\n", "split 'restval' is not among the splits"),
])
def test_a_table_whose_runs_would_collide_or_be_misread_is_refused(tmp_path, text, needle):
    if needle is None:
        load_table(_table(tmp_path, text), [])
        return
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_table(_table(tmp_path, text), [])


@pytest.mark.parametrize("extra, needles", [
    (["--name", "../elsewhere"], ["run.name = '../elsewhere'", "one folder name"]),
    (["tracking.experiment="], ["tracking.experiment = ''", "MLflow refuses it"]),
    (["data.batch_size=600"], ["data.batch_size=600", "30 training captions"]),
    (["--max-concurrent", "0"], ["--max-concurrent 0: must be at least 1"]),  # was run as 1 without a word
], ids=["name-outside-the-runs", "experiment-empty", "batch-larger-than-data", "max-concurrent-0"])
def test_the_command_refuses_before_ray(tmp_path, capsys, extra, needles):
    """tuning.ablation checks its name, every row's batch and MLflow as a job does, before Ray."""
    import ray
    from test_readers import write_precomp

    from tuning import ablation

    write_precomp(tmp_path / "p", {"train": 6, "dev": 2, "test": 2})
    table = _table(tmp_path, "seeds: [0]\nrows:\n  full: {}\n  k1: {loss.top_k: 1}\n")
    args = [str(table), f"data.source=precomp:{tmp_path / 'p'}", "data.text_encoder=foo", "data.batch_size=10",
            f"data.cache_dir={tmp_path / 'cache'}", f"run.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'ml.db'}", *extra]
    assert ablation.main(args) == 2
    said = capsys.readouterr().err.strip()  # an invalid config value lists each key on its own line below
    assert said.startswith("error: ") and all(needle in said for needle in needles), said
    assert not ray.is_initialized() and not (tmp_path / "runs" / "t").exists()


@pytest.mark.parametrize("row, kind", [("on", "bool"), ("no", "bool"), ("2", "int"), ("null", "NoneType")])
def test_a_row_name_yaml_reads_as_no_text_is_refused(tmp_path, row, kind):
    """It passed as str(row), then plan()'s slug(row) failed with a TypeError after Ray had started."""
    path = _table(tmp_path, f"rows:\n  full: {{}}\n  {row}: {{loss.top_k: 1}}\n")
    with pytest.raises(ConfigError, match=rf"t\.yaml: rows: the row name .* is read by YAML as {kind}, not text; "
                                          "quote it"):
        load_table(path, [])
    assert [j["run"] for j in plan(load_table(_table(tmp_path, f"rows: {{'{row}': {{}}}}\n"), [])[1], [0])] == \
        [f"{row}-seed0"]  # quoted, it is a name


def test_a_config_that_is_no_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("t.yaml: config: expected the path of a preset YAML file, "
                                                    "got [1]")):
        load_table(_table(tmp_path, "config: [1]\nrows: {x: {}}\n"), [])  # a TypeError before


def test_a_rows_batch_too_large_for_the_data_names_the_table_and_row(tmp_path, capsys):
    import ray
    from test_readers import write_precomp

    from tuning import ablation

    write_precomp(tmp_path / "p", {"train": 6, "dev": 2, "test": 2})
    table = _table(tmp_path, "seeds: [0]\nrows:\n  full: {}\n  big: {data.batch_size: 600}\n")
    assert ablation.main([str(table), f"data.source=precomp:{tmp_path / 'p'}", "data.text_encoder=foo",
                          "data.batch_size=10", f"data.cache_dir={tmp_path / 'cache'}",
                          f"run.storage_path={tmp_path / 'runs'}", "tracking.enabled=false"]) == 2
    said = capsys.readouterr().err.strip()
    assert said.startswith(f"error: {table}: row 'big': data.batch_size=600 is larger than the 30"), said
    assert not ray.is_initialized()


def test_one_job_per_row_and_seed_with_the_table_and_command_line_overrides(tmp_path):
    path = _table(tmp_path, "config: configs/debug.yaml\nseeds: [3, 4]\noverrides: {train.epochs: 2}\n"
                            "rows:\n  full model: {}\n  linear / K=1: {model.branch: linear, loss.top_k: 1}\n")
    base, rows, seeds = load_table(path, ["loss.margin=0.3"])
    assert base.train.epochs == 2 and base.loss.margin == 0.3 and seeds == [3, 4]
    jobs = plan(rows, seeds)
    assert [(j["trial_id"], j["seed"], j["run"]) for j in jobs] == [
        ("full model", 3, "full-model-seed3"), ("full model", 4, "full-model-seed4"),
        ("linear / K=1", 3, "linear-k-1-seed3"), ("linear / K=1", 4, "linear-k-1-seed4")]
    assert jobs[2]["params"] == {"model.branch": "linear", "loss.top_k": 1}


def _record(row, rsum, val, failed=False):
    test = {k: rsum / 6 for k in RECALLS} | {"rsum": rsum}
    return {"trial_id": row, "summary": None if failed else {"test": test, "val_rsum": val}}


def test_mean_std_and_difference_beyond_the_spread():
    rows = {"a": {}, "b": {"model.branch": "linear"}, "c": {"loss.top_k": 1}, "d": {}}
    records = [_record("a", 300, 310), _record("a", 310, 312), _record("a", 320, 314),
               _record("b", 250, 260), _record("b", 252, 262), _record("b", 0, 0, failed=True),
               _record("c", 305, 300), _record("c", 325, 301),
               _record("d", 0, 0, failed=True)]
    table = {t["row"]: t for t in summarize(rows, records)}
    assert table["a"]["rsum"] == (310.0, 10.0) and table["a"]["val"] == (312.0, 2.0) and table["a"]["seeds"] == 3
    assert table["b"]["seeds"] == 2 and table["b"]["failed"] == 1
    assert table["b"]["rsum"][1] == pytest.approx(math.sqrt(2.0))  # sample std of 250, 252
    assert table["b"]["delta"] == -59.0 and table["b"]["beyond_spread"]
    assert table["c"]["delta"] == 5.0 and not table["c"]["beyond_spread"]  # 5 < sqrt(10^2 + 14.1^2)
    assert table["d"]["rsum"] == (None, 0.0) and table["d"]["delta"] is None
    text = markdown(list(table.values()))
    assert "310.0 ± 10.0" in text and "-59.0 |" in text and "+5.0 (within spread)" in text
    assert "0 (1 failed)" in text and "`model.branch=linear`" in text and "(the preset)" in text


def test_a_failed_runs_record_names_the_error_itself_not_the_head_of_its_traceback():
    """A Ray task error's text is the task's traceback with the error last: the first 300
    characters of it named only the call that failed, never why."""
    from ray.exceptions import RayTaskError

    from tuning.rerun import reason

    trace = "ray::_rerun_task() (pid=1)\n" + "  File \"x.py\", line 1, in f\n    g()\n" * 20 + "OSError: disk full"
    wrapped = RayTaskError("_rerun_task", trace, OSError(28, "No space left on device"))
    assert reason(wrapped) == "OSError: [Errno 28] No space left on device"
    assert reason(ValueError("bad value")) == "ValueError: bad value"
    assert len(reason(RuntimeError("x" * 2000))) == 500
