"""Malformed or unusual settings files and arguments (presets, overrides, search spaces, ablation
tables, cluster.jobs flags) are refused in one line naming the file, key and value, before anything
starts: no traceback, no setting dropped without a word, no hang. No Ray starts here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from itmatch.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "debug.yaml")


def _file(tmp_path: Path, text: str, name: str = "settings.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _refused(call, *args) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args)
    return str(info.value)


# ---- presets and overrides


def test_yaml_problem_says_not_valid_yaml_once_by_the_errors_kind_not_its_text():
    """read_yaml prefixed "not valid YAML" unless read_problem's text held it already: an error
    without a place whose own text said it lost the prefix."""
    from itmatch.files import read_problem, yaml_problem

    placed = pytest.raises(yaml.YAMLError, yaml.safe_load, "a: [1\n").value
    assert yaml_problem(placed) == read_problem(placed) and yaml_problem(placed).count("not valid YAML") == 1
    unplaced = yaml.YAMLError("a value 'not valid YAML'\n  quoted")
    assert yaml_problem(unplaced) == "not valid YAML: a value 'not valid YAML' quoted"


@pytest.mark.parametrize("override, problem", [
    ("train.epochs=*a", "found undefined alias 'a'"),
    ("train.epochs=3\t", "found character '\\t' that cannot start any token"),
    ("train.epochs=!!python/object:os.system {}", "could not determine a constructor"),
])
def test_an_override_that_is_not_yaml_is_one_line_naming_key_and_value(override, problem):
    """PyYAML's own text spans four lines, quoting the value under a caret."""
    said = _refused(load_config, None, [override])
    key, value = override.split("=", 1)
    assert said.startswith(f"override {key}: value {value!r}: line 1, column ") and problem in said, said
    assert "\n" not in said and said.count("not valid YAML") == 1


@pytest.mark.parametrize("override", ["=3", " =3", "="])
def test_an_override_without_a_key_says_so(override):
    said = _refused(load_config, None, [override])
    assert said == f"override {override!r} has no key before '=' (e.g. loss.margin=0.1)"


def test_yaml_nested_thousands_deep_is_refused_not_a_recursion_traceback(tmp_path):
    preset = _file(tmp_path, "train: " + "[" * 5000 + "]" * 5000 + "\n")
    assert _refused(load_config, preset) == \
        f"{preset}: not valid YAML: nested too deeply (lists or mappings inside each other thousands of levels down)"
    assert "nested too deeply" in _refused(load_config, None, ["train.epochs=" + "[" * 5000 + "]" * 5000])


@pytest.mark.parametrize("text, place, char", [("train:\n  epochs: 3\x00\n", "line 2, column 12", "U+0000"),
                                               ("\x07a: 1\n", "line 1, column 1", "U+0007"),
                                               ("a: 1\nb: 2\nc: x\x1b[0m\n", "line 3, column 5", "U+001B")])
def test_a_character_yaml_refuses_is_placed_by_line_and_column_not_by_offset(tmp_path, text, place, char):
    """PyYAML names it "position 18" of the text: a line and column as for every other YAML error."""
    preset = _file(tmp_path, text)
    assert _refused(load_config, preset).startswith(f"{preset}: {place}: not valid YAML: the character {char} ")


def test_an_alias_inside_itself_is_refused_not_a_recursion_traceback(tmp_path):
    """`&t {x: *t}` built a mapping that contains itself: flatten recursed until RecursionError."""
    preset = _file(tmp_path, "train: &t\n  epochs: 3\n  again: *t\n")
    assert _refused(load_config, preset) == (f"{preset}: line 1, column 8: not valid YAML: an alias refers to the "
                                             "mapping or list it is in (it would contain itself)")


def test_aliases_expanding_past_the_limit_are_refused_before_anything_walks_them(tmp_path):
    """Aliases of aliases, six deep, stand for a million values (nine: a billion, a hang or an OOM)."""
    lines = ["a0: &a0 {x: 1, y: 2, z: 3, w: 4, v: 5, u: 6, t: 7, s: 8, r: 9, q: 10}"]
    lines += [f"a{i}: &a{i} {{{', '.join(f'k{j}: *a{i - 1}' for j in range(10))}}}" for i in range(1, 6)]
    preset = _file(tmp_path, "\n".join(lines) + "\n")
    said = _refused(load_config, preset)
    assert said.startswith(f"{preset}: line ") and said.endswith("not valid YAML: its aliases expand to over 100,000 "
                                                                 "values"), said
    from itmatch.config import read_yaml  # shared anchors within the limit still read (merge keys use them)
    assert read_yaml(_file(tmp_path, "a: &a {x: 1}\nb: *a\nc: {<<: *a, y: 2}\n", "ok.yaml"))["c"] == {"x": 1, "y": 2}


def test_a_setting_given_as_a_dotted_key_and_inside_its_section_is_refused(tmp_path):
    """Two different YAML keys, one setting: the second silently won (epochs 40, not 3)."""
    preset = _file(tmp_path, "train.epochs: 3\ntrain:\n  epochs: 40\n  log_every: 2\n")
    assert _refused(load_config, preset) == (f"{preset}: train.epochs is given twice (as a dotted key and inside "
                                             "its section, values 3 and 40); keep one")
    assert load_config(_file(tmp_path, "train.epochs: 3\ntrain:\n  log_every: 2\n")).train.epochs == 3


def test_a_whole_number_beyond_64_bits_is_refused(tmp_path):
    preset = _file(tmp_path, "train:\n  epochs: 99999999999999999999999999\n")
    said = _refused(load_config, preset)
    assert str(preset) in said and "train.epochs = 99999999999999999999999999" in said, said
    assert "beyond 64-bit integers" in said
    # the top of int64 too: Tune's randint samples below high + 1
    assert "beyond 64-bit integers" in _refused(load_config, None, [f"loss.top_k={2**63 - 1}"])


def test_a_whole_number_in_exponent_notation_is_read_as_the_number(tmp_path):
    """YAML 1.1 reads `1e3` as text: `train.epochs=1e3` was "unable to parse string as an integer"
    while `optim.lr=1e-3` was a float."""
    assert load_config(None, ["train.epochs=1e3"]).train.epochs == 1000
    assert load_config(_file(tmp_path, "train:\n  epochs: 2E1\n")).train.epochs == 20
    assert "fractional part" in _refused(load_config, None, ["train.epochs=1.5e0"])
    assert load_config(None, ["run.name=1e3"]).run.name == "1e3"  # text stays text


@pytest.mark.parametrize("key", ["data.cache_dir", "run.storage_path", "tracking.tracking_uri",
                                 "tracking.artifact_location"])
def test_an_empty_folder_or_store_is_refused_not_read_as_the_working_directory(key):
    """`data.cache_dir=` wrote the features into the working directory; `tracking.tracking_uri=`
    passed the store check and failed the run's first attempt inside MLflow (a traceback)."""
    said = _refused(load_config, None, [f"{key}="])
    assert f"{key} = ''" in said and "empty: give" in said, said
    assert not load_config(None, ["run.start_from="]).run.start_from  # an optional path: empty is unset


@pytest.mark.parametrize("key, meant", [("train.Epochs", "train.epochs"), ("los.margin", "loss.margin"),
                                        ("optim.margin", "loss.margin")])
def test_a_misspelt_key_names_the_closest_setting(key, meant):
    said = _refused(load_config, None, [f"{key}=1"])
    assert f"unknown config key {key!r}; did you mean {meant!r}?" in said and "valid here:" in said, said


@pytest.mark.parametrize("override", ['run.name="a\\nb"', "search.name=\"a\\tb\""])
def test_a_run_or_search_name_with_a_control_character_is_refused(override):
    """A quoted name with a line break made a folder (and MLflow run) name that splits log lines."""
    said = _refused(load_config, None, [override])
    assert "without control characters" in said and override.split("=")[0] in said, said


@pytest.mark.parametrize("overrides, named", [
    (["model.image_weights=/w/r.pt"], "model.image_weights='/w/r.pt' has no effect with model.image_tower='features'"),
    (["model.name=single", "model.image_weights=/w/r.pt"], "with model.image_tower='convnet'"),
    (["model.word_vectors=minilm"], "model.word_vectors='minilm' has no effect with model.text_tower='features'"),
])
def test_a_weights_file_for_a_tower_that_takes_none_is_refused(overrides, named):
    """It was ignored without a word: the run trained on cached features while asked for weights."""
    assert named in _refused(load_config, None, overrides)
    assert load_config(None, ["model.name=single", "model.word_vectors=minilm"]).model.word_vectors == "minilm"


def test_a_preset_through_a_pipe_is_read_and_a_device_is_refused_unread(tmp_path):
    """`--config <(sed ... preset.yaml)` was "does not exist"; /dev/zero would fill the memory."""
    read, write = os.pipe()
    os.write(write, b"train:\n  epochs: 3\n")
    os.close(write)
    try:
        assert load_config(f"/dev/fd/{read}").train.epochs == 3
    finally:
        os.close(read)
    said = _refused(load_config, "/dev/zero")
    assert said.startswith("/dev/zero: over 16,777,216 bytes, too large"), said


def test_the_training_command_says_it_in_one_line_with_exit_code_2(tmp_path, capsys):
    from trainers import train

    preset = _file(tmp_path, "train.epochs: 3\ntrain: {epochs: 4}\n")
    assert train.main(["--config", str(preset), "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {preset}: train.epochs is given twice (as a dotted key and inside its section, "
                   "values 3 and 4); keep one"]


# ---- search spaces


@pytest.mark.parametrize("text, key, meant", [
    ("loss.margn: {uniform: [0.1, 0.2]}\n", "loss.margn", "loss.margin"),
    ("los.margin: {uniform: [0.1, 0.2]}\n", "los.margin", "loss.margin"),
    ("'loss.margin ': {uniform: [0.1, 0.2]}\n", "loss.margin ", "loss.margin"),
    ("optim.margin: {uniform: [0.1, 0.2]}\n", "optim.margin", "loss.margin"),
])
def test_an_unknown_space_key_names_the_file_and_the_closest_valid_key(tmp_path, text, key, meant):
    """Was "<file>: loss.margn: value 0.1 is not valid: override: unknown config key ..." (a bound
    blamed, the space called an override, twenty keys and no suggestion)."""
    from tuning.space import load_space

    space = _file(tmp_path, text, "space.yaml")
    said = _refused(load_space, space, load_config(DEBUG))
    assert said.startswith(f"{space}: unknown config key {key!r}; did you mean {meant!r}?"), said
    assert "override" not in said and "value 0.1" not in said


def test_an_unknown_space_key_without_a_close_one_lists_the_sections(tmp_path):
    from tuning.space import load_space

    space = _file(tmp_path, "1: {choice: [1, 2]}\n", "space.yaml")
    assert _refused(load_space, space, load_config(DEBUG)) == (
        f"{space}: unknown config key '1' (at '1'; valid here: data, eval, loss, model, optim, run, scaling, "
        "search, tracking, train)")


def test_a_randint_beyond_64_bits_is_refused_before_tune_samples_it(tmp_path):
    """Tune's randint raised "high is out of bounds for int64" once Ray had started the search."""
    from tuning.space import load_space

    space = _file(tmp_path, "loss.top_k: {randint: [1, 99999999999999999999999]}\n", "space.yaml")
    said = _refused(load_space, space, load_config(DEBUG))
    assert said.startswith(f"{space}: loss.top_k: value 99999999999999999999999 is not valid") and \
        "beyond 64-bit integers" in said, said


@pytest.mark.parametrize("entry, named", [
    ("model.branch: {grid: [linear, linear]}", "model.branch.grid: the value 'linear'"),
    ("loss.top_k: {grid: [1, '1', 2]}", "loss.top_k.grid: the value 1"),
])
def test_a_grid_value_listed_twice_is_refused(tmp_path, entry, named):
    """Each grid point runs num_samples trials: a repeat (also one the config reads as equal) trained
    the same configuration again."""
    from tuning.space import load_space

    space = _file(tmp_path, entry + "\n", "space.yaml")
    assert _refused(load_space, space, load_config(DEBUG)).startswith(f"{space}: {named!s} is listed twice")


def test_the_search_command_names_the_space_file_in_one_line(tmp_path, capsys):
    from tuning import search

    space = _file(tmp_path, "loss.margn: {uniform: [0.1, 0.2]}\n", "space.yaml")
    assert search.main(["--config", DEBUG, "--space", str(space), "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {space}: unknown config key 'loss.margn'; did you mean "
                                               "'loss.margin'?"), err


@pytest.mark.parametrize("flags, named", [
    (["--num-samples", "0"], "search.num_samples = 0 (--num-samples)"),
    (["--max-concurrent", "-2"], "search.max_concurrent = -2 (--max-concurrent)"),
])
def test_a_refused_search_flag_is_named_as_typed_not_as_an_override(flags, named, capsys):
    from tuning import search

    assert search.main(["--config", DEBUG, "--space", str(ROOT / "configs/search/eq6.yaml"), *flags,
                        "--print-config"]) == 2
    assert named in capsys.readouterr().err


def test_a_run_name_on_the_search_command_line_is_refused_not_replaced(capsys):
    """resolve() names the search's run after search.name: `run.name=mine` was dropped without a word."""
    from tuning import search

    assert search.main(["--config", DEBUG, "--space", str(ROOT / "configs/search/eq6.yaml"), "run.name=mine",
                        "--print-config"]) == 2
    assert capsys.readouterr().err.startswith("error: run.name='mine': a search's folder and MLflow run are named "
                                              "by --name (search.name)")


class _Store:
    """What the CCA check reads of a feature store."""
    dims, manifest = (8, 16), {"source": "precomp:/features"}


def _unreached(*args, **kwargs):
    raise AssertionError("reached past the input checks")


def test_a_search_ensembles_cca_wider_than_the_features_is_refused_before_the_trials(tmp_path, capsys, monkeypatch):
    """It failed with "CCA dim must be in [1, 8]" once every trial had trained."""
    from trainers import train
    from tuning import search

    monkeypatch.setattr(train, "prepare_store", lambda cfg: _Store())
    monkeypatch.setattr(search.preflight, "check_batch", _unreached)
    monkeypatch.setattr(search, "run_search", _unreached)
    assert search.main(["--config", DEBUG, "--space", str(ROOT / "configs/search/eq6.yaml"), "--ensemble",
                        "search.ensemble_cca=0.25", "search.ensemble_cca_dim=12", "search.rerun_top=1",
                        f"run.storage_path={tmp_path / 'runs'}"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: search.ensemble_cca_dim=12: at most 8 canonical dimensions (features of precomp:/features are 8-d "
        "image, 16-d text); lower search.ensemble_cca_dim")


@pytest.mark.parametrize("dim", [12, 10**20])
def test_an_ensembles_cca_dim_is_checked_before_its_members_are_staged(monkeypatch, dim):
    """--cca-dim 10**20 was a torch overflow traceback; 12 on 8-d features refused after staging."""
    from trainers import ensemble, train

    monkeypatch.setattr(train, "prepare_store", lambda cfg: _Store())
    monkeypatch.setattr(ensemble, "stage", _unreached)
    said = _refused(ensemble.evaluate_and_log, load_config(DEBUG), [], [], None, 0.5, dim)
    assert said.startswith(f"--cca-dim={dim}: at most 8 canonical dimensions"), said


# ---- ablation tables


def _table(tmp_path: Path, text: str) -> Path:
    return _file(tmp_path, f"config: {DEBUG}\n" + text, "t.yaml")


@pytest.mark.parametrize("text, extra, needle", [
    # JSON round trip of the table's overrides: a TypeError traceback
    ("overrides: {run.name: !!binary aGVsbG8=}\nrows: {x: {}}\n", [], "run.name"),
    ("overrides: {loss.top_k: !!set {a}}\nrows: {x: {}}\n", [], "loss.top_k"),
    # the name 'true' where a preset refuses the boolean
    ("overrides: {tracking.experiment: yes}\nrows: {x: {}}\n", [], "tracking.experiment = True"),
    # set by the table for every run: dropped without a word
    ("overrides: {run.name: mine}\nrows: {x: {}}\n", [],
     "t.yaml: overrides: run.name is set by the table (--name names its folder and runs)"),
    ("overrides: {tracking: {registered_model: mine}}\nrows: {x: {}}\n", [],
     "t.yaml: overrides: tracking.registered_model is set by the table"),
    ("overrides: {train: {seed: 3}}\nrows: {x: {}}\n", [], "t.yaml: overrides: train.seed is set by seeds:"),
    ("rows: {x: {}}\n", ["run.name=mine"], "command line: run.name is set by the table"),
    ("rows: {x: {}}\n", ["train.seed=3"], "command line: train.seed is set by seeds:"),
    ("rows: {x: {}, y: {run: {name: mine}}}\n", [], "row 'y': run.name is set by the table"),
    ("rows: {x: {}, y: {eval: {plots: true}}}\n", [], "row 'y': eval.plots is set by the table"),
    ("rows: {x: {loss.margin: 0.1, loss: {margin: 0.2}}}\n", [],
     "t.yaml: row 'x': loss.margin is given twice (as a dotted key and inside its section, values 0.1 and 0.2)"),
])
def test_an_ablation_setting_that_would_be_dropped_or_crash_is_refused(tmp_path, text, extra, needle):
    from tuning.ablation import load_table

    said = _refused(load_table, _table(tmp_path, text), extra)
    assert needle in said, said


@pytest.mark.parametrize("config", ["configs/nope.yaml", "''"])
def test_an_ablation_tables_missing_preset_names_the_table_and_where_it_was_looked_for(tmp_path, config):
    """Was "config preset 'configs/nope.yaml' does not exist" (or "'.' is a folder"): no table named."""
    from tuning.ablation import load_table

    table = _file(tmp_path, f"config: {config}\nrows: {{x: {{}}}}\n", "t.yaml")
    said = _refused(load_table, table, [])
    assert said.startswith(f"{table}: config: ") and "is no preset file" in said and str(Path.cwd()) in said, said


def test_an_ablation_tables_nested_overrides_still_apply(tmp_path):
    from tuning.ablation import load_table

    base, rows, _ = load_table(_table(tmp_path, "overrides: {loss: {margin: 0.3}}\nrows: {x: {loss: {top_k: 2}}}\n"),
                               ["run.storage_path=elsewhere"])
    assert (base.loss.margin, base.run.storage_path, rows) == (0.3, "elsewhere", {"x": {"loss.top_k": 2}})


def test_an_empty_ablation_name_is_refused_not_replaced_by_the_tables_name(tmp_path, capsys, monkeypatch):
    import ray

    from trainers import train
    from tuning import ablation

    monkeypatch.setattr(train, "prepare_store", _unreached)  # was run as the table's name: data, then Ray
    monkeypatch.setattr(ablation, "run_table", _unreached)
    table = _table(tmp_path, "rows: {x: {}}\n")
    assert ablation.main([str(table), "--name", "", f"run.storage_path={tmp_path / 'runs'}"]) == 2
    assert "run.name = ''" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


# ---- cluster.jobs


@pytest.mark.parametrize("argv, needle", [
    (["stop", "raysubmit_x", "--timeout", "nan"], "argument --timeout: invalid value 'nan': seconds"),  # a hang
    (["stop", "raysubmit_x", "--timeout", "-1"], "argument --timeout: invalid value '-1': seconds"),
    (["list", "--address", ""], "argument --address: empty"),  # fell back to $RAY_ADDRESS or the default
    (["logs", "raysubmit_x", "--address", " "], "argument --address: empty"),
    (["follow", ""], "argument job_id: invalid job id ''"),  # asked /api/jobs/ for the job list
    (["stop", "../raysubmit_x"], "argument job_id: invalid job id '../raysubmit_x'"),
    (["submit", "train", "--job-id", ""], "argument --job-id: invalid job id ''"),  # Ray picked another id
])
def test_a_jobs_flag_that_would_hang_or_reach_another_cluster_is_refused_unsent(argv, needle, capsys, monkeypatch):
    from cluster import jobs

    monkeypatch.setattr(jobs.Jobs, "client", property(lambda self: pytest.fail("contacted a cluster")))
    with pytest.raises(SystemExit) as done:
        jobs.main(argv)
    assert done.value.code == 2 and needle in capsys.readouterr().err


# ---- itm


@pytest.mark.parametrize("argv, said", [
    ([], "error: no command given; usage: itm "),
    (["trian"], "error: unknown command 'trian' (did you mean 'train'?); usage: itm "),
])
def test_itm_says_what_is_wrong_with_its_command(argv, said, capsys):
    """A bare usage line, even for `itm --help`, exit 2 either way."""
    from trainers import cli

    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith(said)
    assert cli.main(["--help"]) == 0 and capsys.readouterr().out.startswith("usage: itm ")


# ---- a network too large for this machine's memory

def test_a_network_whose_training_state_cannot_fit_this_machine_is_refused_before_it_is_built(
        small_precomp, tmp_path, monkeypatch):
    """Was an allocator traceback ("DefaultCPUAllocator: can't allocate memory") from the worker, or
    a kill by the kernel: counted on the meta device, refused naming the sizes; a network that fits,
    a GPU job or one attached to a cluster (other nodes' memory) is not judged here."""
    from itmatch.data.store import prepare
    from itmatch.models import build_model
    from trainers import preflight

    store = prepare(small_precomp, cache_dir=tmp_path / "cache", image_encoder="pixels", text_encoder="hashing",
                    splits=["train", "val", "test"], progress=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    base = ["data.source=x", "data.text_encoder=hashing", "scaling.num_workers=2"]
    said = _refused(preflight.check_model_size, load_config(None, [*base, "model.hidden_dim=100000000"]), store)
    assert said.startswith("the network has ") and "model.hidden_dim=100000000" in said and "GiB" in said
    # 24 B a parameter on each of 2 workers: refused where the machine has less, whatever it has
    cfg = load_config(None, [*base, "model.hidden_dim=64", "model.embed_dim=16", "loss.instance_weight=1"])
    count = preflight._parameters(cfg, store)  # with the instance loss's classifier: one class an image
    built = build_model(*store.dims, cfg.model, n_classes=len(store.split("train").image_ids), heads=cfg.loss.heads)
    assert count == sum(p.numel() for p in built.parameters())
    monkeypatch.setattr(preflight, "_memory_bytes", lambda: count * 24 * 2 - 1)
    assert "on 2 worker(s)" in _refused(preflight.check_model_size, cfg, store)
    monkeypatch.setattr(preflight, "_memory_bytes", lambda: count * 24 * 2)
    preflight.check_model_size(cfg, store)
    monkeypatch.setattr(preflight, "_memory_bytes", lambda: 1)
    for elsewhere in (["scaling.use_gpu=true"], ["run.ray_address=10.0.0.1:6379"], ["scaling.strategy=deepspeed"]):
        preflight.check_model_size(load_config(None, [*base, "model.hidden_dim=64", *elsewhere]), store)
