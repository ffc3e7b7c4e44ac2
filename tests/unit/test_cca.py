"""Regularised CCA checked against its definition, and against the data README's reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.config import ModelConfig
from itmatch.eval.retrieval import retrieval_metrics
from itmatch.models import build_model, is_closed_form
from itmatch.models.cca import CCAModel, fit_cca

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "flickr8k-1k" / "precomp"


def _paired(n=400, dx=12, dy=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)  # shared latent signal
    x = z @ torch.randn(3, dx, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, dx, generator=g, dtype=torch.float64)
    y = z @ torch.randn(3, dy, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, dy, generator=g, dtype=torch.float64)
    return x + 3.0, y - 1.0


def test_projections_satisfy_the_cca_conditions():
    x, y = _paired()
    ridge, k = 1e-3, 5
    (mx, wx), (my, wy), corr = fit_cca(x, y, k, ridge)
    xc, yc, n = x - x.mean(0), y - y.mean(0), len(x) - 1
    cxx = xc.T @ xc / n + ridge * torch.eye(x.shape[1], dtype=x.dtype)
    cyy = yc.T @ yc / n + ridge * torch.eye(y.shape[1], dtype=y.dtype)
    eye = torch.eye(k, dtype=x.dtype)
    torch.testing.assert_close(wx.T @ cxx @ wx, eye)  # whitened under the regularised covariance
    torch.testing.assert_close(wy.T @ cyy @ wy, eye)
    torch.testing.assert_close(wx.T @ (xc.T @ yc / n) @ wy, torch.diag(corr))  # pairwise only, = correlations
    assert torch.all(corr[:-1] >= corr[1:]) and 0 <= corr[-1] and corr[0] <= 1
    assert corr[:3].min() > 0.8 and corr[3:].max() < 0.3  # the 3 shared latent directions are found
    torch.testing.assert_close(mx, x.mean(0))


def test_cca_model_retrieves_pairs_and_rejects_bad_input():
    x, y = _paired(n=300)
    model = build_model(12, 9, ModelConfig(name="cca", embed_dim=3))
    assert is_closed_form(model) and isinstance(model, CCAModel)
    model.fit(x[:200], y[:200], ridge=1e-3)
    m = retrieval_metrics(model.image(x[200:]).float(), model.text(y[200:]).float(), torch.arange(100))
    assert m["i2t_r10"] > 50 and m["t2i_r10"] > 50  # chance is 10
    with pytest.raises(ValueError, match="paired rows"):
        fit_cca(x[:10], y[:9], 2, 0.1)
    with pytest.raises(ValueError, match="dim"):
        fit_cca(x, y, 10, 0.1)
    with pytest.raises(ValueError, match="ridge"):
        fit_cca(x, y, 2, 0.0)


def test_state_dict_round_trip():
    x, y = _paired()
    a = CCAModel(12, 9, 4).fit(x, y, ridge=0.1)
    b = CCAModel(12, 9, 4)
    b.load_state_dict({k: v.float() for k, v in a.state_dict().items()})  # checkpoints store fp32
    torch.testing.assert_close(b.image(x[:5]), a.image(x[:5]), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not REAL.is_dir(), reason=f"reference data not found at {REAL}")
def test_reproduces_the_data_readme_reference():
    """README: CCA (128 dims, ridge 0.3, fit on train) gives test rsum 382.8."""
    ims, caps = np.load(REAL / "train_ims.npy"), np.load(REAL / "train_caps_minilm.npy")
    model = CCAModel(ims.shape[1], caps.shape[1], 128).fit(
        torch.from_numpy(np.repeat(ims, 5, axis=0)), torch.from_numpy(caps), ridge=0.3)
    test_ims, test_caps = np.load(REAL / "test_ims.npy"), np.load(REAL / "test_caps_minilm.npy")
    with torch.no_grad():
        m = retrieval_metrics(model.image(torch.from_numpy(test_ims)), model.text(torch.from_numpy(test_caps)),
                              torch.arange(len(test_ims)).repeat_interleave(5))
    assert m["rsum"] == pytest.approx(382.8, abs=3.0)
