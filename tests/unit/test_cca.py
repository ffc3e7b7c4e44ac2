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


# -- model.residual=cca: the two-branch network learning a correction on top of CCA -------------------

def _residual_net(embed_dim: int, branch: str = "nonlinear"):
    x, y = _paired(n=300)
    cfg = ModelConfig(residual="cca", embed_dim=embed_dim, hidden_dim=16, dropout=0.0, branch=branch)
    torch.manual_seed(0)
    return x, y, build_model(12, 9, cfg).fit_residual(x.float(), y.float(), ridge=1e-3)


@pytest.mark.parametrize("branch", ["nonlinear", "linear"])
def test_residual_network_starts_as_cca(branch):
    x, y, net = _residual_net(embed_dim=3, branch=branch)
    ref = CCAModel(12, 9, 3).fit(x, y, ridge=1e-3)
    net.train()  # batch statistics: the zero BatchNorm scale and shift still give exactly zero
    torch.testing.assert_close(net.image(x.float()), ref.image(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.text(y.float()), ref.text(y), rtol=1e-4, atol=1e-5)


def test_residual_pads_past_the_canonical_dimensions():
    """embed_dim 16 > 9 text features: 9 canonical dimensions, the other 7 zero until trained."""
    x, y, net = _residual_net(embed_dim=16)
    ref = CCAModel(12, 9, 9).fit(x, y, ridge=1e-3)
    img = net.eval().embed_images(x.float())
    assert img.shape == (300, 16) and torch.count_nonzero(img[:, 9:]) == 0
    torch.testing.assert_close(img[:, :9], ref.image(x), rtol=1e-4, atol=1e-5)


def test_residual_learns_its_correction_and_keeps_cca_fixed():
    x, y, net = _residual_net(embed_dim=3)
    fixed = {k: v.clone() for k, v in net.state_dict().items() if "cca_" in k}
    before = net.eval().embed_images(x.float())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net.train()
    for _ in range(3):  # pull each image towards a random target: the learned part must move
        opt.zero_grad()
        (net.image(x.float()) * torch.randn(300, 3, generator=torch.Generator().manual_seed(1))).sum().neg().backward()
        opt.step()
    assert not torch.allclose(net.eval().embed_images(x.float()), before, atol=1e-3)
    assert set(fixed) == {"image.cca_mean", "image.cca_weight", "text.cca_mean", "text.cca_weight"}
    for k, v in fixed.items():  # buffers: saved in checkpoints, never trained
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("overrides", [{"name": "cca"}, {"name": "twoway"}, {"image_tower": "efficientnet_lite0"}])
def test_residual_needs_the_embedding_network_on_features(overrides):
    with pytest.raises(ValueError, match="model.residual='cca' needs"):
        ModelConfig(residual="cca", **overrides)
