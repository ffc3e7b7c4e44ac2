"""itmatch.config: defaults, YAML presets, dotted overrides and the errors they raise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from itmatch.config import Config, ConfigError, load_config, parse_override, save_config, validate

REPO = Path(__file__).resolve().parents[2]


def _preset(tmp_path: Path, text: str, name: str = "preset.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- defaults


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg == Config()
    assert cfg.loss.margin == 0.05
    assert cfg.loss.top_k == 10
    assert cfg.loss.lambdas == (1.0, 1.5, 0.0, 0.0)
    assert cfg.data.neighborhood_sampling is True
    # the defaults survive a full validation round trip
    assert validate(cfg.model_dump()) == cfg


def test_defaults_are_not_shared_between_instances():
    a, b = load_config(), load_config()
    a.loss.margin = 0.3
    assert b.loss.margin == 0.05
    assert Config().loss.margin == 0.05


# --------------------------------------------------------------------------- preset + overrides


def test_preset_then_overrides_win(tmp_path):
    preset = _preset(tmp_path, """
data:
  batch_size: 64
  neighborhood_sampling: true
loss:
  margin: 0.2
  top_k: 5
  lambda4: 0.05
train:
  epochs: 3
""")
    cfg = load_config(preset, ["loss.margin=0.1", "loss.top_k=null", "data.neighborhood_sampling=false"])
    assert cfg.loss.margin == 0.1  # override beats preset
    assert cfg.loss.top_k is None  # YAML null -> None
    assert cfg.data.neighborhood_sampling is False
    assert cfg.data.batch_size == 64  # preset beats default
    assert cfg.loss.lambda4 == 0.05
    assert cfg.train.epochs == 3
    assert cfg.loss.lambda2 == 1.5  # untouched default
    assert cfg.model.hidden_dim == Config().model.hidden_dim


def test_preset_alone_changes_only_what_it_names(tmp_path):
    cfg = load_config(_preset(tmp_path, "optim:\n  lr: 0.001\n"))
    expected = Config().flat()
    expected["optim.lr"] = 0.001
    assert cfg.flat() == expected


def test_override_dict_form_and_value_types():
    cfg = load_config(overrides={"loss.margin": 0.1, "loss.top_k": None, "run.name": "x"})
    assert (cfg.loss.margin, cfg.loss.top_k, cfg.run.name) == (0.1, None, "x")
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override("loss.top_k=null") == ("loss.top_k", None)
    assert parse_override("data.source=precomp:/a/b") == ("data.source", "precomp:/a/b")
    assert parse_override("run.name=") == ("run.name", "")


def test_numeric_looking_strings_stay_strings(tmp_path):
    # YAML reads 2024 as an int and 1.5 as a float; string fields still take them as text
    cfg = load_config(_preset(tmp_path, "run:\n  name: 2024\n"), ["tracking.experiment=7", "data.source=1.5"])
    assert (cfg.run.name, cfg.tracking.experiment, cfg.data.source) == ("2024", "7", "1.5")
    # but a preset's boolean is not text (an override is: the next test)
    with pytest.raises(ConfigError, match="run.name = True: .*boolean.* takes str; quote it"):
        load_config(_preset(tmp_path, "run:\n  name: true\n"))


@pytest.mark.parametrize("override, key, value", [
    ("run.name=my run #2", "name", "my run #2"), ("run.name=yes", "name", "yes"), ("run.name=007", "name", "007"),
    ("run.name='quoted #x'", "name", "quoted #x"), ("run.start_from=null", "start_from", None),
    ("run.start_from=~", "start_from", None)])
def test_an_override_of_a_text_setting_is_the_text_after_the_equals_sign(override, key, value):
    """Read as YAML, `my run #2` lost its comment, `yes` became True (refused) and `precomp:` a
    mapping (an unknown key data.source.precomp); a YAML null still clears an optional setting."""
    assert getattr(load_config(overrides=[override]).run, key) == value
    assert load_config(overrides=["data.source=precomp:/tmp/my data #1"]).data.source == "precomp:/tmp/my data #1"
    assert load_config(overrides=["data.source=precomp:"]).data.source == "precomp:"


@pytest.mark.parametrize("given", ["train.epochs=on", "optim.lr=true", "loss.top_k=yes", "optim.name=no"])
def test_a_boolean_is_not_taken_for_a_number_or_a_choice(given, tmp_path):
    """pydantic's lax mode took True as 1: `epochs: yes` trained one epoch, `optim.lr=true` at 1.0."""
    key = given.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} = (True|False): .*a boolean .* where this key takes"):
        load_config(overrides=[given])
    section, leaf = key.split(".")
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} = (True|False): .*a boolean"):
        load_config(_preset(tmp_path, f"{section}:\n  {leaf}: {given.split('=')[1]}\n"))
    assert load_config(overrides=["model.augment=yes"]).model.augment is True  # a boolean key takes it


def test_a_section_given_a_value_in_a_preset_is_blamed_on_the_preset(tmp_path):
    preset = _preset(tmp_path, "train: 5\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(preset))}: train = 5: train is a section \(keys epochs"):
        load_config(preset, ["train.epochs=3"])


def test_an_override_of_a_text_setting_keeps_the_text_as_typed():
    """YAML reads 007 as 7, 010 as 8 (octal) and 2024.10 as 2024.1: two runs would share a folder."""
    cfg = load_config(overrides=["run.name=007", "search.name=2024.10", "tracking.alias=010", "train.epochs=12"])
    assert (cfg.run.name, cfg.search.name, cfg.tracking.alias) == ("007", "2024.10", "010")
    assert cfg.train.epochs == 12 and load_config(overrides=["loss.margin=0.20"]).loss.margin == 0.2


def test_a_check_across_keys_names_its_keys_not_the_whole_config(tmp_path):
    preset = _preset(tmp_path, "train:\n  epochs: 3\n  metric: overlap\n")
    with pytest.raises(ConfigError) as info:
        load_config(preset)
    message = str(info.value)
    assert "train.metric='overlap'" in message and "epochs" not in message and len(message) < 400


@pytest.mark.parametrize("override", ["train.seed=-1", "train.seed=99999999999999999999", "search.seed=-3"])
def test_a_seed_numpy_cannot_take_is_refused_before_the_run(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(overrides=[override])


def test_override_without_equals_errors():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["loss.margin"])


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "key, bad, valid_sample",
    [
        ("bogus", "bogus", ["data", "loss", "train"]),
        ("loss.bogus", "bogus", ["margin", "top_k", "lambda1"]),
        ("data.batchsize", "batchsize", ["batch_size", "source"]),
    ],
)
def test_unknown_key_names_key_and_lists_valid_keys(key, bad, valid_sample):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[f"{key}=1"])
    message = str(info.value)
    assert key in message
    assert repr(bad) in message
    for name in valid_sample:
        assert name in message


def test_unknown_key_in_preset_names_file_and_key(tmp_path):
    preset = _preset(tmp_path, "loss:\n  margn: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(preset)
    message = str(info.value)
    assert "loss.margn" in message
    assert str(preset) in message
    assert "margin" in message  # the valid keys are listed


@pytest.mark.parametrize("preset_text", [None, "loss:\n  margin: 0.1\n"])
def test_key_below_a_value_is_unknown(tmp_path, preset_text):
    # loss.margin is a leaf: loss.margin.x is an unknown key (whether or not a preset set margin)
    preset = _preset(tmp_path, preset_text) if preset_text else None
    with pytest.raises(ConfigError) as info:
        load_config(preset, ["loss.margin.x=1"])
    message = str(info.value)
    assert "unknown config key 'loss.margin.x'" in message
    assert "loss.margin is a value" in message


# --------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("loss.margin=abc", "loss.margin", "'abc'"),
        ("train.epochs=-1", "train.epochs", "-1"),
        ("loss.top_k=0", "loss.top_k", "0"),
        ("loss.metric=manhattan", "loss.metric", "'manhattan'"),
        ("model.dropout=1.0", "model.dropout", "1.0"),
        ("data.batch_size=1", "data.batch_size", "1"),
    ],
)
def test_wrong_type_or_range_names_key_and_value(override, key, value):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert key in message
    assert value in message


def test_wrong_type_in_preset(tmp_path):
    preset = _preset(tmp_path, "train:\n  epochs: many\n")
    with pytest.raises(ConfigError) as info:
        load_config(preset)
    assert "train.epochs" in str(info.value) and "'many'" in str(info.value)


def test_cross_field_check_batch_vs_workers():
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(overrides=["data.batch_size=6", "scaling.num_workers=4"])
    assert load_config(overrides=["data.batch_size=8", "scaling.num_workers=4"]).data.batch_size == 8


def test_section_given_a_scalar_errors():
    with pytest.raises(ConfigError, match="loss"):
        load_config(overrides=["loss=3"])


def test_a_sections_mapping_sets_its_keys_and_keeps_the_presets_others(tmp_path):
    """`loss={top_k: 1}` replaced the whole section: the preset's margin went back to the default."""
    preset = _preset(tmp_path, "loss:\n  margin: 0.4\n  top_k: 5\n")
    for overrides in (["loss={top_k: 1}"], {"loss": {"top_k": 1}}):
        cfg = load_config(preset, overrides)
        assert (cfg.loss.margin, cfg.loss.top_k) == (0.4, 1)
    with pytest.raises(ConfigError, match="loss.margn"):
        load_config(preset, ["loss={margn: 1}"])


# --------------------------------------------------------------------------- preset files


def test_missing_preset_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_preset_not_a_mapping_errors(tmp_path, text):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_preset(tmp_path, text))


def test_preset_invalid_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="YAML"):
        load_config(_preset(tmp_path, "loss: [unclosed\n"))


def test_a_key_given_twice_is_refused_naming_file_line_and_key(tmp_path):
    """Plain YAML keeps the last of two equal keys without a word; a preset's second `epochs:` would win."""
    preset = _preset(tmp_path, "train:\n  epochs: 3\n  batch: 1\n  epochs: 40\n")
    with pytest.raises(ConfigError) as info:
        load_config(preset)
    assert str(info.value) == f"{preset}: line 4, column 3: not valid YAML: found the key 'epochs' twice"
    equal_elsewhere = _preset(tmp_path, "train:\n  epochs: 3\nrun:\n  epochs_note: 1\n")
    with pytest.raises(ConfigError, match="run.epochs_note"):  # same names in other mappings are no twins
        load_config(equal_elsewhere)


def test_yaml_merge_keys_merge_with_the_keys_given_beside_them_winning(tmp_path):
    """`<<: *anchor` was refused ("could not determine a constructor for the tag ...merge")."""
    from itmatch.config import read_yaml

    table = tmp_path / "rows.yaml"
    table.write_text("a: &base\n  loss.margin: 0.1\n  loss.top_k: 5\nb:\n  <<: *base\n  loss.margin: 0.2\n")
    assert read_yaml(table) == {"a": {"loss.margin": 0.1, "loss.top_k": 5}, "b": {"loss.margin": 0.2, "loss.top_k": 5}}
    preset = _preset(tmp_path, "train: &t\n  epochs: 3\nloss:\n  margin: 0.3\n  <<: {top_k: 7}\n")
    assert (load_config(preset).train.epochs, load_config(preset).loss.top_k) == (3, 7)
    twice = _preset(tmp_path, "loss:\n  <<: {top_k: 7}\n  margin: 0.3\n  margin: 0.4\n")
    with pytest.raises(ConfigError, match="found the key 'margin' twice"):  # given twice beside the merge: refused
        load_config(twice)


def test_preset_encoding_byte_order_mark_and_bad_bytes(tmp_path):
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbftrain:\n  epochs: 7\n")
    assert load_config(bom).train.epochs == 7
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"run:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=re.escape(f"{latin}: line 2: bytes b'\\xe9' at offset 16 are not UTF-8")):
        load_config(latin)


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr=.nan", "loss.margin=-.inf", "optim.lr=.inf"])
def test_float_settings_must_be_finite(override):
    with pytest.raises(ConfigError, match="finite number"):
        load_config(overrides=[override])


@pytest.mark.parametrize("override", ["run.name=..", "run.name=.", "run.name=a/b", "run.name=/abs", "run.name=",
                                      "run.name=a\\b", "search.name=../x"])
def test_run_and_search_names_are_one_folder(override):
    """Else a run's checkpoints land beside or outside the others' (or in run.storage_path itself)."""
    with pytest.raises(ConfigError, match="must be one folder name"):
        load_config(overrides=[override])
    assert load_config(overrides=["run.name=f30k_ViT-B.2", "search.name=2024-12-02"]).run.name == "f30k_ViT-B.2"


def test_a_run_named_by_its_date_stays_a_name(tmp_path):
    """YAML 1.1 reads 2024-12-02 as a date, which no setting takes: presets and overrides keep it text."""
    preset = _preset(tmp_path, "run:\n  name: 2024-12-02\nsearch:\n  name: 2024-12-02 10:00:00\n")
    cfg = load_config(preset)
    assert (cfg.run.name, cfg.search.name) == ("2024-12-02", "2024-12-02 10:00:00")
    assert load_config(overrides=["run.name=2024-12-02"]).run.name == "2024-12-02"
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_empty_preset_is_defaults(tmp_path):
    assert load_config(_preset(tmp_path, "")) == Config()


# --------------------------------------------------------------------------- flat round trip


def test_flat_round_trips_through_overrides(tmp_path):
    cfg = load_config(overrides=[
        "loss.margin=0.1", "loss.top_k=null", "data.neighborhood_sampling=false",
        "optim.grad_clip=null", "run.ray_address=auto", "scaling.cpus_per_worker=1.5",
        "model.branch=linear", "train.epochs=7",
    ])
    flat = cfg.flat()
    assert all(isinstance(k, str) and "." in k for k in flat)
    assert flat["loss.margin"] == 0.1 and flat["loss.top_k"] is None
    assert load_config(overrides=flat) == cfg
    # and through the string form the CLI uses
    strings = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
               for k, v in flat.items()]
    assert load_config(overrides=strings) == cfg
    # every field of every section is in the flat form
    n_fields = sum(len(type(getattr(cfg, s)).model_fields) for s in Config.model_fields)
    assert len(flat) == n_fields


# --------------------------------------------------------------------------- repo presets


PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def test_repo_has_presets():
    assert PRESETS, f"no presets under {REPO / 'configs'}"


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_repo_presets_load(preset):
    cfg = load_config(preset)
    raw = yaml.safe_load(preset.read_text()) or {}
    flat = cfg.flat()
    # every value the preset names is what the config holds
    for section, values in raw.items():
        for key, value in values.items():
            assert flat[f"{section}.{key}"] == value, f"{preset.name}: {section}.{key}"


def test_a_refit_and_keep_take_their_values():
    # the real-data preset refits its ensemble; turning the ensemble off alone must stay possible
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "flickr8k_precomp.yaml", ["search.ensemble=false"])
    assert cfg.search.refit and not cfg.search.ensemble and cfg.train.keep == "best"
    with pytest.raises(ConfigError, match="train.keep"):
        load_config(None, ["data.source=x", "train.keep=first"])


def test_training_on_the_validation_split_is_said_once_unless_the_last_epoch_is_kept(caplog):
    from trainers.preflight import warn_in_sample

    def warns(*keys: str) -> bool:
        return warn_in_sample(load_config(None, ["data.source=x", *keys]))

    with caplog.at_level("WARNING", logger="itmatch.preflight"):
        assert warns("data.train_split=train+val")
    assert "validation scores are in-sample" in caplog.text
    assert warns("data.train_split=val+restval")
    assert not warns("data.train_split=train+val", "train.keep=last")
    assert not warns("data.train_split=train+restval") and not warns()


def test_a_test_split_trained_or_validated_on_is_said(caplog):
    from trainers.preflight import warn_test_in_sample

    def warns(*keys: str) -> bool:
        return warn_test_in_sample(load_config(None, ["data.source=x", *keys]))

    with caplog.at_level("WARNING", logger="itmatch.preflight"):
        assert warns("data.val_split=test")
    assert "data.val_split=test holds the test split 'test'" in caplog.text
    assert warns("data.test_split=train") and warns("data.train_split=train+test")
    assert not warns() and not warns("data.train_split=train+val")


@pytest.mark.parametrize("name", ["", "train+", "+val", "train+ val", "train++val"])
def test_a_split_name_with_an_empty_or_padded_part_is_refused_naming_it(name):
    with pytest.raises(ConfigError, match=r"data.train_split.*joined by '\+'"):
        load_config(None, ["data.source=x", f"data.train_split={name}"])


def test_a_bad_override_is_not_blamed_on_the_preset(tmp_path):
    preset = _preset(tmp_path, "train:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(preset, ["train.epochs=abc"])
    assert "train.epochs = 'abc' (an override)" in str(info.value)
    bad_preset = _preset(tmp_path, "train:\n  epochs: abc\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad_preset, [])
    assert "train.epochs = 'abc':" in str(info.value)  # the preset's own value: no "(an override)"
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path, [])


def test_a_home_relative_path_is_expanded_as_a_shell_would(monkeypatch, tmp_path):
    """`~` was kept: a folder named `~` in the working directory took the run (run.storage_path), the
    feature cache failed inside pyarrow (which expands it itself), and precomp:~/x was "not a directory"."""
    from itmatch.data.sources import parse_source

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(overrides=["data.cache_dir=~/cache", "run.storage_path=~/runs", "tracking.artifact_location=~/a",
                                 "tracking.tracking_uri=sqlite:///~/m.db", "run.name=~x"])
    assert (cfg.data.cache_dir, cfg.run.storage_path, cfg.tracking.artifact_location, cfg.tracking.tracking_uri) == \
        (f"{tmp_path}/cache", f"{tmp_path}/runs", f"{tmp_path}/a", f"sqlite:///{tmp_path}/m.db")
    assert cfg.run.name == "~x"  # a name, not a path
    assert parse_source("precomp:~/p").location == f"{tmp_path}/p"
    assert parse_source("karpathy:~/d.json:~/images?restval=train").location == f"{tmp_path}/d.json:{tmp_path}/images"


def test_mlflows_own_variable_sets_the_default_store(monkeypatch):
    """trainers.train logged into ./mlruns.db with MLFLOW_TRACKING_URI set, where trainers.evaluate
    (and every MLflow client) looked in the variable's store."""
    import itmatch.config

    monkeypatch.setattr(itmatch.config, "ENV_TRACKING_URI", None)
    assert load_config().tracking.tracking_uri == "sqlite:///mlruns.db"
    monkeypatch.setattr(itmatch.config, "ENV_TRACKING_URI", "http://mlflow:5000")  # as the process started
    assert load_config().tracking.tracking_uri == "http://mlflow:5000"
    monkeypatch.setattr(itmatch.config, "ENV_TRACKING_URI", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")  # set later (mlflow.set_tracking_uri)
    assert load_config().tracking.tracking_uri == "sqlite:///mlruns.db"
    assert load_config(overrides=["tracking.tracking_uri=sqlite:///x.db"]).tracking.tracking_uri == "sqlite:///x.db"


def test_a_check_across_keys_names_the_override_that_broke_it():
    """It was blamed on the preset alone: configs/shapes_phrases.yaml: invalid config."""
    with pytest.raises(ConfigError, match=r"configs/shapes_phrases.yaml: invalid config\n.*train.metric='rsum'.*"
                                          r"\(train.metric: an override\)"):
        load_config(Path(__file__).resolve().parents[2] / "configs" / "shapes_phrases.yaml", ["train.metric=rsum"])
