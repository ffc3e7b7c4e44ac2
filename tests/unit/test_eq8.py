"""001 Eq. 8 as a config option (eval.region_phrase_model / region_phrase_data / eq8_alpha): the
eq8_* metrics of the evaluation paths (trainers.results.evaluate_folder, the end of a training job;
trainers.evaluate's flags) against a brute-force loop over every (image, sentence) pair of the two
models' embeddings, α = 0 against the plain metrics, the sentences JSON lining up with the phrase
store of the same folder, and bad input refused by key and value. No Ray."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from itmatch.config import ConfigError, load_config
from itmatch.data.raw import prepare_inputs
from itmatch.data.sources import DataError
from itmatch.data.store import SplitRows
from itmatch.eval.eq8 import PREFIX, align, evaluate_eq8
from itmatch.eval.evaluate import embed_split, evaluate_embeddings
from itmatch.models import build_model
from itmatch.phrases.entities import read_entities
from itmatch.state import TrainState, save_checkpoint

N_IMAGES = 60
ENCODERS = ["data.image_encoder=pixels", "data.text_encoder=hashing"]
SIZES = ["model.hidden_dim=32", "model.embed_dim=16"]
SIMILARITY = ["model.name=similarity", "loss.name=logistic"]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("eq8")


@pytest.fixture(scope="module")
def phrase_source(tmp) -> str:
    return f"shapes-phrases:{tmp / 'shapes'}?n_images={N_IMAGES}&seed=3"


@pytest.fixture(scope="module")
def phrase_store(tmp, phrase_source):
    return prepare_inputs(phrase_source, cache_dir=tmp / "cache", raw_images=False, image_encoder="pixels",
                          text_encoder="hashing", splits=["train", "val", "test"])


@pytest.fixture(scope="module")
def sentence_source(tmp, phrase_store) -> str:
    return f"karpathy:{tmp / 'shapes' / 'dataset_sentences.json'}"  # written with the scenes


@pytest.fixture(scope="module")
def sentence_store(tmp, sentence_source):
    return prepare_inputs(sentence_source, cache_dir=tmp / "cache", raw_images=False, image_encoder="pixels",
                          text_encoder="hashing", splits=["train", "val", "test"])


def _folder(tmp, name: str, network: str, source: str, dims, *extra: str):
    """A checkpoint folder of an untrained (seeded) network: rankings are arbitrary, and a
    reference has to reproduce them exactly."""
    cfg = load_config(None, [f"data.source={source}", f"data.cache_dir={tmp / 'cache'}", *ENCODERS, *SIZES,
                             "data.batch_size=20", *(SIMILARITY if network == "similarity" else []), *extra])
    torch.manual_seed(sum(map(ord, name)))
    model = build_model(*dims, cfg.model).eval()
    return save_checkpoint(tmp / name, model=model, cfg=cfg, train_state=TrainState(), dims=dims), cfg


@pytest.fixture(scope="module")
def phrase_folders(tmp, phrase_source, phrase_store):
    return {net: _folder(tmp, f"rp-{net}", net, phrase_source, tuple(phrase_store.dims))[0]
            for net in ("embedding", "similarity")}


# --------------------------------------------------------------------------- the reference


def _pair_distance(net, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Distances of a against every row of b, one network at a time (float64): the similarity
    network's 2 sigmoid(-p), else the unit vectors' Euclidean distance."""
    if hasattr(net, "pair_scores"):
        with torch.no_grad():
            p = net.pair_scores(a[None, :].expand_as(b), b).double().numpy()
        return 2.0 / (1.0 + np.exp(p))
    return np.sqrt(np.maximum(2.0 - 2.0 * (b.double().numpy() @ a.double().numpy()), 0.0))


def reference_eq8(model, phrase_model, split, phrases, alpha: float) -> dict[str, float]:
    """Eq. 8 by brute force: per (image, sentence) the mean over the sentence's phrases (those with
    its caption id) of the distance to the nearest proposal of the image (regions with a negative
    group id, of the picture with its image id), combined with d; then every query's rank by loops."""
    img, txt = embed_split(model, split)
    reg, phr = embed_split(phrase_model, phrases)
    region_image = phrases.picture_ids[phrases.region_picture]
    I, S = len(split.image_ids), len(split)
    D = np.zeros((I, S))
    for i, image_id in enumerate(split.image_ids):
        proposals = np.flatnonzero((phrases.image_ids < 0) & (region_image == image_id))
        for s in range(S):
            d = float(_pair_distance(model, img[i], txt[s:s + 1])[0])
            mine = np.flatnonzero(phrases.phrase_caption == split.caption_ids[s])
            if len(mine) == 0 or len(proposals) == 0:
                D[i, s] = d
                continue
            d_rp = np.mean([_pair_distance(phrase_model, phr[m], reg[proposals]).min() for m in mine])
            D[i, s] = (1 - alpha) * d + alpha * d_rp
    own = split.caption_image
    i2t = [1 + sum(D[i, s] <= D[i, own == i].min() for s in range(S) if own[s] != i) for i in range(I)]
    t2i = [1 + sum(D[j, s] <= D[own[s], s] for j in range(I) if j != own[s]) for s in range(S)]
    out = {}
    for prefix, ranks in (("i2t", np.array(i2t)), ("t2i", np.array(t2i))):
        out.update({f"{prefix}_r{k}": 100.0 * np.mean(ranks <= k) for k in (1, 5, 10)})
        out[f"{prefix}_medr"], out[f"{prefix}_meanr"] = math.floor(np.median(ranks)), float(np.mean(ranks))
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10))
    return out


# --------------------------------------------------------------------------- the data


def test_sentences_json_is_the_phrase_data_sentences(tmp, phrase_store, sentence_store):
    """karpathy:<root>/dataset_sentences.json holds the Entities captions with the reader's ids,
    and every phrase of a split lines up with a sentence of the same split."""
    corpus = read_entities(tmp / "shapes")
    for name in ("train", "test"):
        split, phrases = sentence_store.split(name), phrase_store.split(name)
        caps = corpus.split(name).captions
        assert split.caption_ids.tolist() == caps.column("caption_id").to_pylist()
        assert split.texts == caps.column("text").to_pylist()
        alignment = align(split, phrases)
        assert alignment.phrase_rows.tolist() == list(range(len(phrases)))  # no phrase left out
        rows = alignment.image_regions
        assert (phrases.image_ids[rows[rows >= 0]] < 0).all()  # proposals only, never a ground truth
        np.testing.assert_array_equal(phrases.picture_ids[phrases.region_picture[np.maximum(rows[:, 0], 0)]],
                                      split.image_ids)


# --------------------------------------------------------------------------- the metrics


@pytest.mark.parametrize("sentence_net, phrase_net, split_name, alpha", [
    ("embedding", "embedding", "train", 0.2), ("similarity", "similarity", "test", 0.2),
    ("embedding", "similarity", "val", 0.5), ("similarity", "embedding", "test", 1.0)])
def test_end_of_run_eq8_metrics_match_a_brute_force_loop(tmp, sentence_source, sentence_store, phrase_store,
                                                         phrase_folders, sentence_net, phrase_net, split_name, alpha):
    from trainers.results import evaluate_folder
    from itmatch.state import load_model

    folder, cfg = _folder(tmp, f"is-{sentence_net}-{phrase_net}", sentence_net, sentence_source,
                          tuple(sentence_store.dims), f"eval.region_phrase_model={phrase_folders[phrase_net]}",
                          f"eval.eq8_alpha={alpha}")
    split = sentence_store.split(split_name)
    got = evaluate_folder(folder, split, cfg, split_name=split_name)
    want = reference_eq8(load_model(folder)[0], load_model(phrase_folders[phrase_net])[0], split,
                         phrase_store.split(split_name), alpha)
    assert {k[len(PREFIX):]: v for k, v in got.items() if k.startswith(PREFIX)} == pytest.approx(want)
    plain = evaluate_embeddings(load_model(folder)[0], *embed_split(load_model(folder)[0], split), split)
    assert {k: got[k] for k in plain} == pytest.approx(plain)  # the plain metrics unchanged beside them


@pytest.mark.parametrize("network, split_name", [("embedding", "train"), ("similarity", "val")])
def test_alpha_zero_is_the_plain_ranking_and_alpha_changes_it(sentence_store, phrase_store, network, split_name):
    cfg = load_config(None, SIZES + (SIMILARITY if network == "similarity" else []))
    torch.manual_seed(1)
    model = build_model(*sentence_store.dims, cfg.model).eval()
    phrase_model = build_model(*phrase_store.dims, cfg.model).eval()
    split, phrases = sentence_store.split(split_name), phrase_store.split(split_name)
    img, txt = embed_split(model, split)
    plain = {PREFIX + k: v for k, v in evaluate_embeddings(model, img, txt, split, sentences=False).items()}
    assert evaluate_eq8(model, img, txt, split, phrase_model, phrases, alpha=0.0) == pytest.approx(plain)
    assert evaluate_eq8(model, img, txt, split, phrase_model, phrases, alpha=0.5) != pytest.approx(plain)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, needles", [
    (["eval.eq8_alpha=1.5"], ["eval.eq8_alpha", "1.5"]),
    (["eval.eq8_alpha=-0.1"], ["eval.eq8_alpha", "-0.1"]),
    (["eval.region_phrase_data=synthetic:/d"], ["eval.region_phrase_data", "synthetic:/d", "not region-phrase"]),
    # keys a run of this data ignored without a word
    (["eval.region_phrase_data=shapes-phrases:/d"], ["eval.region_phrase_data='shapes-phrases:/d'",
                                                    "eval.region_phrase_model", "not set"]),
    (["data.augment_positives=5"], ["data.augment_positives=5", "image-caption data"]),
    (["data.source=shapes-phrases:/d", "eval.region_phrase_model=/m"], ["eval.region_phrase_model='/m'",
                                                                        "phrase localization data"]),
])
def test_bad_keys_are_refused_by_name(overrides, needles):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert all(n in str(err.value) for n in needles), str(err.value)


def test_align_refuses_other_images_or_sentences(sentence_store, phrase_store):
    split, phrases = sentence_store.split("test"), phrase_store.split("test")

    def rows(**change) -> SplitRows:
        fields = dict(image_ids=split.image_ids, caption_ids=split.caption_ids, caption_image=split.caption_image,
                      texts=split.texts)
        return SplitRows(**{**fields, **change})

    cases = [(rows(image_ids=split.image_ids + 10_000), "are not in the region-phrase data"),
             (rows(caption_ids=split.caption_ids + 10_000), "none of the"),
             (rows(texts=[t[::-1] for t in split.texts]), "does not contain its phrase")]
    for bad, needle in cases:
        with pytest.raises(DataError, match=needle) as err:
            align(bad, phrases, "KEY")
        assert str(err.value).startswith("KEY: ") and "\n" not in str(err.value)


def test_preflight_refuses_before_training(tmp, sentence_source, sentence_store, phrase_folders, phrase_source):
    """trainers.preflight.check_eq8 (run before Ray starts): a model that is not a region-phrase
    model, a folder that is no model, and sentences that are not the phrase data's (the shapes
    captions of the same folder: same images, other sentences), each one line naming the key."""
    from trainers.preflight import check_eq8

    is_folder, _ = _folder(tmp, "is-plain", "embedding", sentence_source, tuple(sentence_store.dims))
    other = prepare_inputs(f"karpathy:{tmp / 'shapes' / 'dataset_shapes.json'}", cache_dir=tmp / "cache",
                           raw_images=False, image_encoder="pixels", text_encoder="hashing", splits=["test"])
    base = [f"data.source={sentence_source}", f"data.cache_dir={tmp / 'cache'}", *ENCODERS]
    cases = [(sentence_store, [f"eval.region_phrase_model={is_folder}"], ConfigError, "not a region-phrase model"),
             (sentence_store, [f"eval.region_phrase_model={tmp / 'nothing'}"], ConfigError, "not a checkpoint folder"),
             (other, [f"eval.region_phrase_model={phrase_folders['embedding']}"], DataError,
              "does not contain its phrase")]
    for store, overrides, kind, needle in cases:
        with pytest.raises(kind, match=needle) as err:
            check_eq8(load_config(None, base + overrides), store)
        assert "eval.region_phrase" in str(err.value) and "\n" not in str(err.value), str(err.value)
    check_eq8(load_config(None, base + [f"eval.region_phrase_model={phrase_folders['embedding']}",
                                        f"eval.region_phrase_data={phrase_source}"]), sentence_store)


def test_evaluate_cli_reports_eq8_beside_the_plain_metrics(tmp, sentence_source, sentence_store, phrase_store,
                                                           phrase_folders, capsys):
    from trainers import evaluate

    folder, _ = _folder(tmp, "is-cli", "embedding", sentence_source, tuple(sentence_store.dims))
    common = ["--model", str(folder), "--data", sentence_source, "--cache-dir", str(tmp / "cache")]
    assert evaluate.main(common + ["--json", str(tmp / "out" / "plain.json")]) == 0  # its folder is made
    assert evaluate.main(common + ["--json", str(tmp / "out")]) == 2  # a folder: refused before evaluating
    assert "--json" in capsys.readouterr().err
    (tmp / "a-file").write_text("")
    assert evaluate.main(common + ["--json", str(tmp / "a-file" / "m.json")]) == 2  # unwritable: refused before
    out, err = capsys.readouterr()
    assert "cannot write there" in err and "a-file" in err and "rsum" not in out, (out, err)
    assert evaluate.main(common + ["--json", str(tmp / "out" / "eq8.json"), "--region-phrase-model",
                                   str(phrase_folders["embedding"]), "--eq8-alpha", "0.3"]) == 0
    plain, both = (json.loads((tmp / "out" / f"{n}.json").read_text()) for n in ("plain", "eq8"))
    assert {k: both[k] for k in plain} == plain
    from itmatch.state import load_model

    want = reference_eq8(load_model(folder)[0], load_model(phrase_folders["embedding"])[0],
                         sentence_store.split("test"), phrase_store.split("test"), 0.3)
    assert {k[len(PREFIX):]: v for k, v in both.items() if k.startswith(PREFIX)} == pytest.approx(want)
    capsys.readouterr()
    assert evaluate.main(common + ["--region-phrase-model", str(phrase_folders["embedding"]),
                                   "--eq8-alpha", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --eq8-alpha (eval.eq8_alpha) = 1.5") and "\n" not in err, err
    assert evaluate.main(common + ["--region-phrase-model", str(folder)]) == 2  # not a region-phrase model
    err = capsys.readouterr().err.strip()
    assert "eval.region_phrase_model" in err and "not a region-phrase model" in err, err


def test_trials_and_ray_jobs_get_absolute_eq8_paths(tmp_path, monkeypatch):
    """Tune runs a trial in its own folder: a relative region-phrase model or data path would point
    elsewhere there, so the job config resolves them (URIs stay as they are)."""
    from trainers.job import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config(None, ["eval.region_phrase_model=runs/phr/best_model",
                                            "eval.region_phrase_data=shapes-phrases:data/sp?n_images=40"]))
    assert cfg.eval.region_phrase_model == str(tmp_path / "runs" / "phr" / "best_model")
    assert cfg.eval.region_phrase_data == f"shapes-phrases:{tmp_path / 'data' / 'sp'}?n_images=40"
    uri = absolute_paths(load_config(None, ["eval.region_phrase_model=models:/phrases@champion"]))
    assert uri.eval.region_phrase_model == "models:/phrases@champion"


def test_the_overlap_metric_is_the_same_with_and_without_the_plots(tmp, sentence_source, sentence_store):
    """eval.plots=false (a search's trials) draws nothing and still reports `overlap`, the very
    value the similarity plot shows; with a plots folder the plots are written (no training curve
    for an untrained checkpoint: it has no history)."""
    import torch

    from itmatch.eval.retrieval import overlap_indicator
    from itmatch.state import load_model
    from trainers.results import evaluate_folder

    folder, cfg = _folder(tmp, "overlap", "embedding", sentence_source, tuple(sentence_store.dims))
    split = sentence_store.split("test")
    bare = evaluate_folder(folder, split, cfg)
    drawn = evaluate_folder(folder, split, cfg, plots_dir=tmp / "plots-overlap")
    img, txt = embed_split(load_model(folder)[0], split)
    assert bare["overlap"] == drawn["overlap"] == overlap_indicator(img, txt, torch.from_numpy(split.caption_image))
    assert sorted(p.name for p in (tmp / "plots-overlap").iterdir()) == ["recall.png", "similarity.png"]
