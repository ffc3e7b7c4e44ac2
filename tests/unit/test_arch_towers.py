"""Image towers and featurizers named <library>:<arch> (timm:<arch>, torchvision:<arch>): names,
the missing-library message, the registered model's pip requirements, and (where the library is
importable; `.venv` has neither timm nor torchvision) weights from a file and from timm's local
cache, stages for model.image_train_last, the forward on prepared images and the featurizer.
Nothing here downloads: the caches are pointed at empty temporary folders."""

from __future__ import annotations

import logging
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from itmatch.config import ModelConfig
from itmatch.data.encoders import EncoderError, EncoderUnavailableError, build_image_encoder
from itmatch.models.towers import build_image_tower, check_tower_names


def _images(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (90 + 10 * i, 120, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """torch's hub cache and the Hugging Face cache in empty folders (returns the latter)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hf = tmp_path / "hf"
    try:
        from huggingface_hub import constants
    except ImportError:
        return hf
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf))
    return hf


# --------------------------------------------------------------------------- without the libraries


def test_missing_timm_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError, installed or not
    with pytest.raises(EncoderUnavailableError, match=r"timm:resnet18 needs timm.*pip install timm.*torchvision"):
        build_image_encoder("timm:resnet18", weights_path=str(tmp_path / "none.pth"))
    with pytest.raises(EncoderUnavailableError, match="pip install timm"):
        build_image_tower(ModelConfig(image_tower="timm:resnet18", image_size=64))


@pytest.mark.parametrize("name", ["timm:", "timm", "torchvision:", "torchvision", "timmy:resnet18", "hf:resnet18"])
def test_bad_arch_tower_names_are_refused_with_the_choices(name):
    with pytest.raises(KeyError, match=r"choices: .*torchvision:<arch>, timm:<arch>"):
        check_tower_names(ModelConfig(image_tower=name))


def test_arch_tower_names_pass_without_building():
    for name in ("timm:resnet18", "timm:convnext_tiny.fb_in1k", "torchvision:resnet50"):
        check_tower_names(ModelConfig(image_tower=name))  # timm / torchvision need not be installed


def test_bad_featurizer_names_list_timm():
    for name in ("timm:", "timmy:resnet18"):
        with pytest.raises(EncoderError, match=r"choices: .*torchvision:<arch>, timm:<arch>"):
            build_image_encoder(name)


def test_data_image_encoder_names_are_checked_before_encoding():
    import pyarrow as pa

    from itmatch.data.sources import DataError
    from itmatch.data.store import check_encoder_names

    class Pixels:  # a source that carries images, so an image encoder is needed
        name, captions = "stub", pa.table({"text": ["a red disc"]})

        def payload(self) -> str:
            return "image"

        def has_caption_features(self) -> bool:
            return False

    for name in ("timm:resnet18", "torchvision:resnet50", "pixels"):
        check_encoder_names(Pixels(), name, "hashing")
    for name in ("timm", "timm:", "timmy:resnet18"):
        with pytest.raises(DataError, match=r"unknown image encoder; choices: .*timm:<arch>"):
            check_encoder_names(Pixels(), name, "hashing")


def test_pip_requirements_follow_the_image_networks():
    pytest.importorskip("mlflow")
    from trainers.tracking import PIP_REQUIREMENTS, pip_requirements

    installed = {"transformers": "4.1.0", "torchvision": "0.29.1", "timm": "1.0.31"}.get

    def extra(*names, version=installed):
        got = pip_requirements(*names, version=version)
        assert got[:len(PIP_REQUIREMENTS)] == list(PIP_REQUIREMENTS)
        return got[len(PIP_REQUIREMENTS):]

    assert extra("features", "efficientnet_lite0") == ["transformers==4.1.0"]
    assert extra("efficientnet_lite0", None) == ["transformers==4.1.0"]
    assert extra("torchvision:resnet50", "efficientnet_lite0") == ["transformers==4.1.0", "torchvision==0.29.1"]
    assert extra("timm:convnext_tiny", None) == ["transformers==4.1.0", "torchvision==0.29.1", "timm==1.0.31"]
    # features from a torchvision featurizer: serving raw images runs it
    assert extra("features", "torchvision:resnet50") == ["transformers==4.1.0", "torchvision==0.29.1"]
    assert extra("timm:resnet18", version=lambda name: None) == ["transformers", "torchvision", "timm"]
    real = pip_requirements("timm:resnet18")  # the installed versions (no +cpu label), or unpinned names
    assert not any("+" in r for r in real)
    assert {r.split("==")[0] for r in real[len(PIP_REQUIREMENTS):]} == {"transformers", "torchvision", "timm"}
    assert not any(r.startswith(("torchvision", "timm")) for r in pip_requirements("features", "pixels"))


# --------------------------------------------------------------------------- timm (where importable)


def _freezes_all_but_the_last(tower, trainable: list[torch.nn.Module], frozen: list[torch.nn.Module]) -> None:
    assert all(p.requires_grad for m in trainable for p in m.parameters())
    assert not any(p.requires_grad for m in frozen for p in m.parameters())


def _loaded_resnet18(name: str, ref: torch.nn.Module, path, caplog):
    """`name` (timm:resnet18, torchvision:resnet18) built without weights says so loudly; built from
    `path` (ref's state dict) with image_train_last=2 it holds every tensor of `ref` and trains only
    layer3 and layer4. Returns that tower."""
    with caplog.at_level(logging.WARNING, logger="itmatch.models"):
        rand = build_image_tower(ModelConfig(image_tower=name, image_size=64))
    assert f"IMAGE TOWER {name} STARTS FROM RANDOM WEIGHTS" in caplog.text
    tower = build_image_tower(ModelConfig(image_tower=name, image_size=64, image_weights=str(path), image_train_last=2))
    net, want = tower.net, ref.state_dict()
    for key, value in net.state_dict().items():
        assert torch.equal(value, want[key]), key
    assert not torch.equal(rand.net.conv1.weight, net.conv1.weight)
    _freezes_all_but_the_last(tower, [net.layer3, net.layer4], [net.conv1, net.bn1, net.layer1, net.layer2])
    return tower


def _tower_at_224_is_the_featurizer(name: str, path, feats: np.ndarray) -> None:
    """The frozen tower at the featurizer's 224 px computes what the featurizer computed."""
    frozen224 = build_image_tower(ModelConfig(image_tower=name, image_weights=str(path))).eval()
    with torch.no_grad():
        np.testing.assert_allclose(frozen224(frozen224.prepare(_images())).numpy(), feats, rtol=1e-4, atol=1e-4)


def test_timm_tower_and_featurizer(tmp_path, empty_caches, caplog):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False)  # with its classifier, as timm saves it
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    offline = os.environ.get("HF_HUB_OFFLINE")
    tower = _loaded_resnet18("timm:resnet18", ref, path, caplog)
    assert os.environ.get("HF_HUB_OFFLINE") == offline  # set for the cache lookup only
    net = tower.net
    assert tower.out_dim == net.num_features == 512
    assert len(tower.stages) == 5  # group_matcher(coarse=True): stem, layer1..4

    data = timm.data.resolve_data_config({}, model=net)
    pixels = tower.prepare(_images())
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 3, 64, 64)
    assert tower.prepare.resize == math.floor(64 / data["crop_pct"]) and tower.prepare.resample == "bicubic"
    with torch.no_grad():
        out = tower.eval()(pixels)
    assert out.shape == (2, tower.out_dim) and torch.isfinite(out).all()

    enc = build_image_encoder("timm:resnet18", weights_path=str(path))
    assert (enc.name, enc.dim, enc.size, enc.resize) == ("timm:resnet18", 512, 224, math.floor(224 / data["crop_pct"]))
    feats = enc.encode(_images())
    assert feats.shape == (2, 512) and feats.dtype == np.float32
    _tower_at_224_is_the_featurizer("timm:resnet18", path, feats)

    safetensors = pytest.importorskip("safetensors.torch")
    st = tmp_path / "resnet18.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(st))
    np.testing.assert_allclose(build_image_encoder("timm:resnet18", weights_path=str(st)).encode(_images()), feats,
                               rtol=1e-5, atol=1e-5)


def test_timm_refuses_unknown_archs_wrong_files_and_sizes(tmp_path, empty_caches):
    pytest.importorskip("timm")
    with pytest.raises(EncoderError, match=r"timm:resnet_nope: unknown architecture.*resnet.*timm\.list_models"):
        build_image_tower(ModelConfig(image_tower="timm:resnet_nope", image_size=64))
    bad = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(EncoderError, match="does not fit the architecture"):
        build_image_tower(ModelConfig(image_tower="timm:resnet18", image_size=64, image_weights=str(bad)))
    with pytest.raises(EncoderUnavailableError, match="nothing is downloaded"):  # a featurizer needs weights
        build_image_encoder("timm:resnet18")
    with pytest.raises(EncoderError, match="cannot take 64 px inputs"):  # a ViT built for 224 px
        build_image_tower(ModelConfig(image_tower="timm:vit_tiny_patch16_224", image_size=64))


def test_timm_width_is_what_the_forward_gives(tmp_path, empty_caches):
    """MobileNetV3's pre-logits conv widens num_features (576) to head_hidden_size (1024)."""
    timm = pytest.importorskip("timm")
    path = tmp_path / "mnv3.pth"
    torch.save(timm.create_model("mobilenetv3_small_100").state_dict(), path)
    tower = build_image_tower(ModelConfig(image_tower="timm:mobilenetv3_small_100", image_size=64,
                                          image_weights=str(path)))
    enc = build_image_encoder("timm:mobilenetv3_small_100", weights_path=str(path))
    assert tower.out_dim == enc.dim == tower.net.head_hidden_size == 1024 != tower.net.num_features
    assert enc.encode(_images()).shape == (2, 1024)


def test_timm_weights_from_its_local_cache(tmp_path, empty_caches):
    """Weights already in the Hugging Face cache (laid out as a download leaves them) are found offline."""
    timm = pytest.importorskip("timm")
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(1)
    ref = timm.create_model("resnet18", pretrained=False)
    repo = empty_caches / f"models--{ref.pretrained_cfg['hf_hub_id'].replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    safetensors.save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
                          str(repo / "snapshots" / commit / "model.safetensors"))
    tower = build_image_tower(ModelConfig(image_tower="timm:resnet18", image_size=64))
    want = ref.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in tower.net.state_dict().items())
    assert build_image_encoder("timm:resnet18").dim == 512  # the featurizer finds them too


# --------------------------------------------------------------------------- torchvision (where importable)


def test_torchvision_tower_and_featurizer(tmp_path, empty_caches, caplog):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_weights.pth"
    torch.save(ref.state_dict(), path)
    tower = _loaded_resnet18("torchvision:resnet18", ref, path, caplog)
    assert tower.out_dim == 512 and len(tower.stages) == 6  # conv1, bn1, layer1..4 (fc is gone)
    pixels = tower.prepare(_images())
    assert pixels.shape == (2, 3, 64, 64)
    with torch.no_grad():
        assert tower.eval()(pixels).shape == (2, 512)

    enc = build_image_encoder("torchvision:resnet18", weights_path=str(path))
    feats = enc.encode(_images())
    assert feats.shape == (2, 512) and (enc.size, enc.resize) == (224, 256)
    _tower_at_224_is_the_featurizer("torchvision:resnet18", path, feats)
