"""Hubness correction (itmatch.models.hubness; `search.ensemble_hubness`, `trainers.ensemble --hubness`):
the corrected dot product against CSLS computed pair by pair with sorted lists, the choice on a
validation score (a planted hub is corrected; nothing that only ties the plain score is kept), the
correction through an ensemble's save and load (bad records refused with the file named), and the
ensemble trainer fitting it on a real split."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from itmatch.config import ConfigError, load_config
from itmatch.data.store import prepare
from itmatch.eval.evaluate import embed_split, evaluate_split
from itmatch.eval.retrieval import retrieval_metrics
from itmatch.models.ensemble import Ensemble, save_ensemble, save_hubness
from itmatch.models.hubness import HubnessCorrection, choose, penalty, sample_rows
from itmatch.state import CheckpointError, load_model, save_checkpoint
from tests.unit.test_ensemble_weights import TINY, _member, _paired
from trainers.dist import WorkerContext
from trainers.loop import Trainer


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def _csls_loop(img, txt, bank_img, bank_txt, k: int, w: float) -> torch.Tensor:
    """score(i, t) = cos(i, t) - w (mean of i's k best cosines to the bank's captions + t's to its images)."""
    def r(x, bank):
        return sum(sorted((float(x @ b) for b in bank), reverse=True)[:k]) / min(k, len(bank))

    out = torch.zeros(len(img), len(txt))
    for a, i in enumerate(img):
        for b, t in enumerate(txt):
            out[a, b] = float(i @ t) - w * (r(i, bank_txt) + r(t, bank_img))
    return out


@pytest.mark.parametrize("k", [1, 3, 50])  # 50 > the bank: every bank row counts
def test_the_corrected_dot_product_is_csls_against_the_bank(k):
    img, txt, bank_img, bank_txt = _unit(7, 12, 0), _unit(9, 12, 1), _unit(5, 12, 2), _unit(6, 12, 3)
    corr = HubnessCorrection(bank_img, bank_txt, k, 0.3)
    scores = corr.images(3 * img) @ corr.texts(txt).T  # any scale: the embeddings are normalised first
    torch.testing.assert_close(scores, _csls_loop(img, txt, bank_img, bank_txt, k, 0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(corr.images(img)[:, :12], img)  # the unit part stays as it was
    assert penalty(img, bank_txt, k, block=2).shape == (7,)


def test_a_planted_hub_is_corrected_and_a_tie_is_not_kept():
    g = torch.Generator().manual_seed(0)
    common = _unit(1, 32, 9)  # every image leans toward one direction ...
    img = F.normalize(_unit(40, 32, 1) + common, dim=1)
    txt = F.normalize(img - common + 0.3 * torch.randn(40, 32, generator=g) / 32 ** 0.5, dim=1)
    txt[0] = common[0]  # ... and image 0's caption is that direction: nearer every image than its own caption
    bank_img = F.normalize(_unit(50, 32, 2) + common, dim=1)  # training images lean the same way
    bank_txt = _unit(50, 32, 3)
    owner = torch.arange(40)

    def r1_i2t(i, t):
        return retrieval_metrics(i, t, owner)["i2t_r1"]

    picked = choose(img, txt, bank_img, bank_txt, r1_i2t, grid=[(5, 0.25), (5, 0.5)])
    assert picked.plain < 10 and picked.weight > 0 and picked.score > picked.plain
    assert picked.score == max(v for _, _, v in picked.tried)
    flat = choose(img, txt, bank_img, bank_txt, lambda i, t: 1.0, grid=[(5, 0.25), (5, 0.5)])
    assert (flat.k, flat.weight, flat.score) == (0, 0.0, 1.0)  # ties keep the plain embeddings


def test_bad_banks_are_refused():
    with pytest.raises(ValueError, match="one width"):
        HubnessCorrection(_unit(3, 4, 0), _unit(3, 5, 0), 2, 0.5)
    with pytest.raises(ValueError, match="k >= 1"):
        HubnessCorrection(_unit(3, 4, 0), _unit(3, 4, 0), 0, 0.5)
    corr = HubnessCorrection(_unit(3, 4, 0), _unit(3, 4, 0), 2, 0.5)
    with pytest.raises(ValueError, match="bank is 4 wide, the model's embeddings 6"):
        corr.texts(_unit(2, 6, 0))
    rows = sample_rows(10, 4, seed=1)
    assert len(rows) == 4 and rows.tolist() == sorted(set(rows.tolist())) and sample_rows(3, 4).tolist() == [0, 1, 2]


def test_the_correction_survives_save_and_load(tmp_path):
    x, y = _paired(30, 0)
    folders = [_member(tmp_path / "a", 3, 1), _member(tmp_path / "b", 4, 2)]
    saved = save_ensemble(tmp_path / "ens", folders)
    plain, _ = load_model(saved)
    bank_img, bank_txt = plain.embed_images(_paired(50, 9)[0]), plain.embed_texts(_paired(50, 9)[1])
    corr = HubnessCorrection(bank_img, bank_txt, 5, 0.5)
    save_hubness(saved, corr, "train: 50 images, 50 captions")
    loaded, _ = load_model(saved)
    torch.testing.assert_close(loaded.embed_images(x) @ loaded.embed_texts(y).T,
                               corr.images(plain.embed_images(x)) @ corr.texts(plain.embed_texts(y)).T,
                               rtol=1e-3, atol=2e-3)  # the bank is stored in float16
    assert loaded.core_dim == 7 and Ensemble(plain.members).core_dim is None
    record = json.loads((saved / "ensemble.json").read_text())
    (saved / "ensemble.json").write_text(json.dumps({**record, "hubness": {"k": 5}}))
    with pytest.raises(CheckpointError, match="ensemble.json.*hubness"):
        load_model(saved)
    (saved / "ensemble.json").write_text(json.dumps(record))
    good = (saved / "hubness.pt").read_bytes()
    for bad in (b"not a tensor file", None):  # garbage, then a bank of the wrong keys
        if bad is None:
            torch.save({"images": torch.zeros(2, 7)}, saved / "hubness.pt")
        else:
            (saved / "hubness.pt").write_bytes(bad)
        with pytest.raises(CheckpointError, match="ensemble.json: hubness bank .*hubness.pt"):
            load_model(saved)
    (saved / "hubness.pt").write_bytes(good)
    assert load_model(saved)[0].hubness.k == 5
    (saved / "hubness.pt").unlink()
    with pytest.raises(CheckpointError, match="ensemble.json.*hubness.pt"):
        load_model(saved)
    save_ensemble(saved, folders)  # rewritten without a correction: no stale bank is picked up
    assert load_model(saved)[0].hubness is None


def test_the_ensemble_trainer_fits_the_correction_on_validation(small_precomp, tmp_path, monkeypatch):
    from trainers.ensemble import evaluate_and_log

    base = [f"data.source={small_precomp}", f"data.cache_dir={tmp_path / 'cache'}",
            f"run.storage_path={tmp_path / 'runs'}", *TINY]
    store = prepare(small_precomp, cache_dir=tmp_path / "cache", image_encoder="pixels", text_encoder="hashing",
                    splits=["train", "val", "test"], progress=False)
    cfg = load_config(None, base)
    trainer = Trainer(cfg, store, WorkerContext(0, 1, 0, torch.device("cpu")), None)
    trainer.fit(lambda metrics, save: None)
    run = save_checkpoint(tmp_path / "run", model=trainer.strategy.full_state_dict(trainer.model), cfg=cfg,
                          train_state=trainer.state, dims=trainer.dims)
    auto = evaluate_and_log(load_config(None, [*base, "run.name=auto"]), [run], [str(run)], hubness="auto")
    hub = auto["hubness"]
    tried = [t["val_rsum"] for t in hub["tried"]]
    assert len(tried) == 6 and hub["val_rsum"] == max([hub["val_rsum_plain"], *tried])
    assert (load_model(auto["best_checkpoint"])[0].hubness is None) == (hub["weight"] == 0)
    assert auto["val_rsum"] == pytest.approx(hub["val_rsum"], abs=0.5)  # float16 bank on disk

    summary = evaluate_and_log(load_config(None, [*base, "run.name=fixed"]), [run], [str(run)], hubness="3,0.5")
    assert (summary["hubness"]["k"], summary["hubness"]["weight"]) == (3, 0.5)
    model, _ = load_model(summary["best_checkpoint"])
    assert model.hubness.k == 3 and len(model.hubness.ref_images) == len(store.split("train").image_ids)
    test = store.split("test")
    assert summary["test"]["rsum"] == pytest.approx(evaluate_split(model, test)["rsum"])
    plain_model = Ensemble(model.members)
    plain = evaluate_split(plain_model, test)
    assert summary["test"]["s2s_r1"] == pytest.approx(plain["s2s_r1"])  # captions vs captions: plain cosines
    (img, txt), (pi, pt) = embed_split(model, test), embed_split(plain_model, test)
    bank = [embed_split(plain_model, store.split("train"))[i] for i in (0, 1)]
    torch.testing.assert_close(img @ txt.T, _csls_loop(pi, pt, *bank, 3, 0.5), rtol=1e-3, atol=2e-3)

    # a training split larger than the bank: a seeded subset of rows, embedded alone, not the whole split
    monkeypatch.setattr("trainers.ensemble.BANK_ROWS", 7)
    small = evaluate_and_log(load_config(None, [*base, "run.name=small"]), [run], [str(run)], hubness="3,0.5")
    sub = load_model(small["best_checkpoint"])[0].hubness
    rows_i, rows_t = sample_rows(len(bank[0]), 7, cfg.train.seed), sample_rows(len(bank[1]), 7, cfg.train.seed)
    assert len(bank[1]) > 7 and sub.ref_images.shape[0] == sub.ref_texts.shape[0] == 7
    torch.testing.assert_close(sub.ref_images, F.normalize(bank[0][rows_i], dim=1), rtol=0, atol=1e-3)
    torch.testing.assert_close(sub.ref_texts, F.normalize(bank[1][rows_t], dim=1), rtol=0, atol=1e-3)


@pytest.mark.parametrize("text", ["always", "0,0.5", "3,0", "3,-1", "3", "a,b", "3,inf", "3:0.5"])
def test_bad_settings_are_refused_with_the_value(text):
    from trainers.ensemble import hubness_setting

    with pytest.raises(ConfigError, match="off, auto or K,W"):
        hubness_setting(text)
    with pytest.raises(ConfigError, match="search.ensemble_hubness"):
        load_config(None, ["data.source=x", f"search.ensemble_hubness={text}"])
