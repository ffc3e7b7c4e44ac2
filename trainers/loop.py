"""`train_loop_per_worker`: what every Ray Train worker runs.

Rebuild the config, build data/model/optimizer from registries, resume from the latest Ray
checkpoint, then per epoch: train, evaluate on the validation split, report metrics and (rank 0)
a checkpoint holding everything needed to resume exactly plus the best weights so far.
"""

from __future__ import annotations

import logging
import os
import tempfile
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from itmatch.config import Config, ConfigError, validate
from itmatch.accumulate import embed_rows
from itmatch.data.batch import Batch, TowerCache, caption_items, make_batch
from itmatch.data.batching import NeighborhoodBatchSampler, shards_per_rank
from itmatch.data.raw import RawStore, open_store
from itmatch.data.store import FeatureStore
from itmatch.eval.evaluate import evaluate_split
from itmatch.eval.retrieval import format_metrics
from itmatch.dist import any_worker, gather_for, gather_rows, mean_over_workers
from itmatch.losses import build_objective
from itmatch.models import build_model, is_closed_form
from itmatch.models.towers import cache_views
from itmatch.optim import build_optimizer, build_scheduler
from itmatch.state import (CHECKSUM_FILE, TrainState, epoch_seed, load_checkpoint, rank_sums_name, save_checkpoint,
                           write_rank_sums)
from trainers.dist import WorkerContext, worker_context
from trainers.logs import quiet_ray_reports, setup_logging
from trainers.strategies import build_strategy

log = logging.getLogger("itmatch.train")
BEST_DIR = "best"


def deterministic_kernels() -> None:
    """train.deterministic: cuBLAS needs its workspace fixed before its first call in the process
    (init_ray also puts it in every Ray process's environment)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


class Trainer:
    """The state of one worker's run; `fit()` is the whole loop."""

    def __init__(self, cfg: Config, store: FeatureStore | RawStore, ctx: WorkerContext,
                 tracking: Optional[dict]) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.store_root = str(store.root)
        self.train_split = store.split(cfg.data.train_split)
        self.val_split = store.split(cfg.data.val_split)
        self.dims = store.dims
        if cfg.train.deterministic:
            deterministic_kernels()
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every run
        self.heads = cfg.loss.heads  # instance classifier / class centers: one class per training image
        self.n_classes = len(self.train_split.image_ids) if self.heads else 0
        model = build_model(*store.dims, cfg.model, n_classes=self.n_classes, heads=self.heads)
        self.closed_form = is_closed_form(model)
        if cfg.model.residual == "cca":  # before the strategy wraps it; every rank fits the same map
            model.fit_residual(*self.train_pairs(), ridge=cfg.model.cca_ridge)
        if hasattr(model.text_tower, "fit_vocabulary"):  # word-level towers: the training split's words only
            model.text_tower.fit_vocabulary(self.train_split.texts)
        self.epochs = 1 if self.closed_form else cfg.train.epochs  # a fitted model needs one pass
        self.strategy = build_strategy(cfg, ctx, closed_form=self.closed_form)
        self.sampler = NeighborhoodBatchSampler(
            self.train_split.caption_image, cfg.data.batch_size, rank=ctx.rank, world_size=ctx.world_size,
            seed=cfg.train.seed, neighborhood=cfg.data.neighborhood_sampling, drop_last=cfg.data.drop_last,
            shard_by=self.train_split.caption_shard, shards_per_rank=shards_per_rank(cfg.data.task))
        self.steps_per_epoch = len(self.sampler)
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} leaves no full batch in "
                             f"{len(self.train_split)} training captions")
        self.model, self.optimizer, self.scheduler = self.strategy.setup(
            model,
            lambda groups: build_optimizer(groups, cfg.optim),
            lambda opt: build_scheduler(opt, cfg.optim, self.steps_per_epoch, cfg.train.epochs,
                                        towers_frozen_epochs=cfg.model.tower_frozen_epochs))
        self.objective = build_objective(cfg.loss)
        self.gather = gather_for(cfg.loss.mining)  # after Ray Train set up the process group
        self.state = TrainState()
        self.epoch = 0
        self.best_weights: Optional[dict] = None
        self.epoch_weights: Optional[dict] = None  # fp32 full weights of the epoch just trained
        self.eval_model: Optional[torch.nn.Module] = None  # fp32, unsharded copy for evaluation
        self.tower_cache: Optional[TowerCache] = None  # Stage I's frozen tower outputs (model.tower_cache_stage_one)
        self.tracker = _tracker(tracking) if ctx.is_main and tracking else None
        self.monitor = _system_monitor(cfg, ctx, tracking)

    # -- resume / checkpoint ------------------------------------------------------------------
    def restore(self, folder: Path) -> None:
        """Every rank loads the same checkpoint (DeepSpeed: each its own shards)."""
        payload, _ = load_checkpoint(folder)
        self.strategy.load_state(folder, payload, self.model, self.optimizer, self.scheduler)
        self.sampler.load_state_dict(payload["sampler"])
        self.state = payload["train_state"]
        if (folder / BEST_DIR).is_dir():
            self.best_weights = load_checkpoint(folder / BEST_DIR)[0]["model"]

    def start_from(self, folder: Path) -> None:
        """A new run continuing another's checkpoint (`run.start_from`; PBT's exploit): its weights,
        optimizer moments, sampler, epoch, history and schedule position, with this config's
        learning rates and weight decay (a checkpoint's optimizer state would restore its own)."""
        from itmatch.optim import retarget

        self.restore(folder)
        retarget(self.optimizer, self.scheduler, self.cfg.optim)

    def save(self, folder: Path) -> None:
        """Called, from `report`, on every rank that saves (rank 0; every rank under DeepSpeed,
        where writing the shards is collective). The weights are the epoch's consolidated copy."""
        extra = self.strategy.save_state(folder, self.model, self.optimizer, self.scheduler)
        shards = extra.pop("shards", None)  # the folder where every rank writes files of its own
        if shards:
            write_rank_sums(folder / shards, self.ctx.rank)
        if not self.ctx.is_main:
            return
        rank_sums = tuple(f"{shards}/{rank_sums_name(r)}" for r in range(self.ctx.world_size)) if shards else ()
        if self.best_weights is not None:  # first, and listed by the checkpoint's checksums: one without
            # it is damaged (a resume would take the epoch's weights for the best ones)
            save_checkpoint(folder / BEST_DIR, model=self.best_weights, cfg=self.cfg,
                            train_state=self.state, dims=self.dims)
            rank_sums += (f"{BEST_DIR}/{CHECKSUM_FILE}",)
        save_checkpoint(folder, model=self.epoch_weights, cfg=self.cfg, train_state=self.state, dims=self.dims,
                        optimizer=extra.pop("optimizer"), scheduler=extra.pop("scheduler"),
                        sampler=self.sampler.state_dict(), extra=extra, rank_sums=rank_sums)

    # -- one epoch ---------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        if self.closed_form:
            return self.fit_closed_form()
        self.epoch, start = epoch, time.perf_counter()  # the epoch's time includes building a tower cache
        self.set_train_mode(epoch)
        self.sampler.set_epoch(epoch)
        self.hold_tower_cache(epoch)  # before seeding: it draws nothing, and must not shift what follows
        torch.manual_seed(epoch_seed(self.cfg.train.seed, self.ctx.rank, epoch))
        totals: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}  # a skipped (non-finite) step has no loss terms
        steps = 0
        for batch in self.batches(epoch):
            out = self.train_step(batch.to(self.ctx.device))
            for key, value in out.items():
                totals[key] = totals.get(key, 0.0) + value.detach()
                counts[key] = counts.get(key, 0) + 1
            steps += 1
            _maybe_hold(epoch + 1, steps, self.ctx.rank)
            if self.ctx.is_main and steps % self.cfg.train.log_every == 0 and "loss" in out:  # .item() syncs only here
                log.info("epoch %d step %d/%d loss %.4f lr %.2e", epoch + 1, steps, self.steps_per_epoch,
                         float(out["loss"].detach()), self.scheduler.get_last_lr()[0])
        if not self.uses_tower_cache(epoch + 1):  # the Stage I/II boundary: free the tables before validation
            self.tower_cache = None
        stats = {f"train_{k}": float(v) / counts[k] for k, v in totals.items()}
        if "skipped_steps" in totals:
            stats["train_skipped_steps"] = float(totals["skipped_steps"])
        stats["epoch_time_s"] = time.perf_counter() - start
        return mean_over_workers(stats, self.ctx.device)

    @property
    def prepare(self) -> tuple:
        """Raw items -> tower inputs (feature rows, or decoded + augmented pixels and token ids)."""
        model = self.strategy.unwrap(self.model)
        return model.image_tower.prepare, model.text_tower.prepare

    def set_train_mode(self, epoch: int) -> None:
        """Train mode, except towers that do not learn this epoch (frozen throughout, or in 004's
        Stage I): they run in eval mode and without gradients."""
        self.model.train()
        model = self.strategy.unwrap(self.model)
        stage_one = epoch < self.cfg.model.tower_frozen_epochs
        model.freeze_towers(stage_one)
        for tower in (model.image_tower, model.text_tower):
            if stage_one or not tower.trainable:
                tower.eval()

    # -- Stage I on cached tower features ------------------------------------------------------
    def uses_tower_cache(self, epoch: int) -> bool:
        m = self.cfg.model
        return m.tower_cache_stage_one and epoch < m.tower_frozen_epochs and not self.closed_form

    def hold_tower_cache(self, epoch: int) -> None:
        """Build the tower cache when this epoch is the first of Stage I that this process trains
        (a resumed run rebuilds it); free it once Stage I is over."""
        if not self.uses_tower_cache(epoch):
            self.tower_cache = None
        elif self.tower_cache is None:
            self.tower_cache = self.build_tower_cache()

    def build_tower_cache(self) -> TowerCache:
        """The frozen towers' outputs (eval mode, set by `set_train_mode`) for every image and caption
        of the training split: each worker embeds a contiguous share, and every worker gets the whole
        tables, since its batches may hold any row."""
        start, split = time.perf_counter(), self.train_split
        model = self.strategy.unwrap(self.model)
        prepare_image, prepare_text = self.prepare
        images = self._tower_table(model.image_tower, len(split.image_ids),
                                   lambda rows: cache_views(prepare_image, split.images_at(rows)))
        texts = self._tower_table(model.text_tower, len(split),
                                  lambda rows: cache_views(prepare_text, caption_items(split, prepare_text, rows)))
        if self.ctx.is_main:
            log.info("Stage I tower cache: %d images (%d view%s) and %d captions embedded in %.1fs", len(images[0]),
                     len(images), "s" if len(images) > 1 else "", len(texts[0]), time.perf_counter() - start)
        return TowerCache(images=images, texts=texts[0])

    def _tower_table(self, tower: torch.nn.Module, n: int,
                     views_of: Callable[[np.ndarray], list[Any]]) -> list[torch.Tensor]:
        """One tower's [n, D] tables (one per view `views_of(rows)` gives) from this worker's share
        of the rows, gathered over the workers. Every share is non-empty: the sampler refuses a
        split with fewer images than workers."""
        world, rank = self.ctx.world_size, self.ctx.rank
        lo, hi = n * rank // world, n * (rank + 1) // world
        local = embed_rows(tower, lambda a, b: views_of(np.arange(lo + a, lo + b)), hi - lo,
                           chunk=getattr(tower, "eval_batch", self.cfg.train.eval_chunk),
                           passes=self.strategy.passes(self.model), autocast=self.strategy.autocast,
                           device=self.ctx.device, dtype=self.strategy.input_dtype(self.model))
        return [gather_rows(t) for t in local]

    def batches(self, epoch: int) -> Iterator[Batch]:
        """This rank's batches for the rest of the epoch; each step's augmentation is drawn from
        (seed, epoch, rank, step), so a resumed run replays it, whichever loader prepares it.
        Stage I on the tower cache cuts them from its tables here (no decoding: no Ray Data)."""
        d, seed, rank = self.cfg.data, self.cfg.train.seed, self.ctx.rank
        if self.tower_cache is not None:
            for captions in self.sampler:
                rng = np.random.default_rng([seed, epoch, rank, self.sampler.state.offset - 1])
                yield self.tower_cache.batch(self.train_split, captions, rng)
            return
        if d.loader == "ray":
            from trainers.input_pipeline import ray_batches

            plan = [(self.sampler.state.offset - 1, captions) for captions in self.sampler]
            yield from ray_batches(self.store_root, d.train_split, plan, self.prepare, seed=seed, epoch=epoch,
                                   rank=rank, actors=d.loader_actors, prefetch=d.prefetch_batches,
                                   actor_cpus=d.loader_cpus, data=d)
            return
        for captions in self.sampler:
            step = self.sampler.state.offset - 1  # the sampler has already advanced past this batch
            rng = np.random.default_rng([seed, epoch, rank, step])
            yield make_batch(self.train_split, captions, *self.prepare, train=True, rng=rng, data=self.cfg.data)

    def train_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (image, caption) pair of the training split as feature rows."""
        from itmatch.models.cca import training_pairs

        return training_pairs(self.train_split)

    def fit_closed_form(self) -> dict[str, float]:
        """Fit on every (image, caption) pair of the training split at once."""
        start = time.perf_counter()
        self.strategy.unwrap(self.model).fit(*self.train_pairs(), ridge=self.cfg.model.cca_ridge)
        return {"epoch_time_s": time.perf_counter() - start}

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimizer step: the objective's inputs, the model's named outputs, the objective."""
        batch = self.objective.prepare(batch)
        chunk = self.cfg.train.grad_cache_chunk
        if chunk:  # forward and backward, the towers `chunk` rows at a time; the update below
            out = self.strategy.cached_step(self.model, batch, self.objective, chunk=chunk, gather=self.gather,
                                            epoch=self.epoch)
        else:
            with self.strategy.autocast():
                outputs = self.model(batch.cast_inputs(self.strategy.input_dtype(self.model)))
            out = self.objective(outputs, batch, gather=self.gather, epoch=self.epoch)
        if any_worker(not bool(torch.isfinite(out["loss"])), self.ctx.device):
            return self.skip_nonfinite(out)
        out["grad_norm"] = self.strategy.step(self.model, self.optimizer, self.scheduler) if chunk else \
            self.strategy.backward_step(self.model, out["loss"], self.optimizer, self.scheduler)
        self.state.step += 1
        self.state.samples_seen += len(batch) * self.ctx.world_size
        return out

    def skip_nonfinite(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A non-finite loss on any worker: stop (train.nonfinite=stop, the default), or drop this
        step on every worker — no update, no schedule step — so no checkpoint is ever poisoned."""
        terms = {k: round(float(v.detach()), 6) for k, v in out.items()}
        if self.cfg.train.nonfinite == "stop":
            raise FloatingPointError(f"non-finite loss at step {self.state.step} (epoch {self.epoch + 1}): {terms}; "
                                     "train.nonfinite=skip drops such steps instead")
        self.strategy.unwrap(self.model).zero_grad(set_to_none=True)  # gradient caching has backpropagated
        if self.ctx.is_main:
            log.warning("skipping step %d of epoch %d: non-finite loss %s", self.state.step, self.epoch + 1, terms)
        return {"skipped_steps": torch.ones((), device=self.ctx.device)}

    def validate(self, weights: dict) -> dict[str, float]:
        """Validation metrics of these (consolidated) weights, identical on every rank (they pick
        the best checkpoint, and every rank must agree on that: under ZeRO-3 saving is collective)."""
        if self.eval_model is None:
            self.eval_model = build_model(*self.dims, self.cfg.model, n_classes=self.n_classes,
                                          heads=self.heads).to(self.ctx.device)
        self.eval_model.load_state_dict(weights)
        val = evaluate_split(self.eval_model, self.val_split, chunk=self.cfg.train.eval_chunk, device=self.ctx.device)
        return mean_over_workers(val, self.ctx.device)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, report) -> None:
        try:
            self._fit(report)
        finally:
            if self.monitor is not None:  # its last samples reach the run before the driver ends it
                self.monitor.finish()

    def _fit(self, report) -> None:
        started_at = self.state.epoch
        if started_at >= self.epochs and self.state.history:
            self.report_restored(report)
        for epoch in range(self.state.epoch, self.epochs):
            metrics = self.train_epoch(epoch)
            # One consolidation per epoch (a collective gather under ZeRO-3) serves validation,
            # the best weights and the checkpoint.
            self.epoch_weights = self.strategy.full_state_dict(self.model)
            val = self.validate(self.epoch_weights)
            metrics.update({f"val_{k}": v for k, v in val.items()})
            score = val[self.cfg.train.metric]
            self.state.epoch = epoch + 1
            if self.state.improved(score) or self.cfg.train.keep == "last":
                self.state.best_metric, self.state.best_epoch = score, epoch + 1
                self.best_weights = self.epoch_weights
            metrics.update(epoch=epoch + 1, step=self.state.step, best_metric=self.state.best_metric)
            self.state.history.append({k: float(v) for k, v in metrics.items()})
            if self.ctx.is_main:
                loss = f"loss {metrics['train_loss']:.4f}" if "train_loss" in metrics else "fitted"
                log.info("epoch %d/%d %s | val %s | best %s=%.2f @%d (%.1fs)", epoch + 1, self.epochs, loss,
                         format_metrics(val), self.cfg.train.metric, self.state.best_metric, self.state.best_epoch,
                         metrics["epoch_time_s"])
                if self.tracker:
                    self.tracker(metrics, epoch + 1)
            saves = (self.ctx.is_main or self.strategy.saves_on_every_rank) and self.checkpoint_due(epoch + 1)
            report(metrics, self.save if saves else None)
            _maybe_inject_failure(started_at, epoch + 1)


    def checkpoint_due(self, epoch: int) -> bool:
        """run.checkpoint_every: every N epochs, and the last (what the run ends with)."""
        return epoch % self.cfg.run.checkpoint_every == 0 or epoch >= self.epochs

    def report_restored(self, report) -> None:
        """Nothing is left to train (PBT cloned a donor at its last epoch; a resumed run that had
        ended): report the restored state once, so the run still ends with its own checkpoint."""
        self.epoch_weights = self.strategy.full_state_dict(self.model)
        if self.best_weights is None:
            self.best_weights = self.epoch_weights
        report(dict(self.state.history[-1]), self.save if self.ctx.is_main or self.strategy.saves_on_every_rank
               else None)


@dataclass(frozen=True)
class FaultInjection:
    """The ITMATCH_* fault-injection settings (see `_maybe_inject_failure`, `_maybe_hold`), parsed."""
    fail_at: Optional[int] = None
    hold_at: frozenset[tuple[int, int]] = frozenset()
    hold_dir: Optional[Path] = None
    hold_timeout_s: float = 600.0


def fault_injection() -> FaultInjection:
    """Parse the ITMATCH_* variables, raising ConfigError naming the variable and its value. The
    driver calls this before anything starts: parsed lazily in the loop, a typo failed an attempt
    mid-run (and was retried as a crash) or, for ITMATCH_HOLD_AT, silently never held."""
    env = os.environ
    raw_fail = env.get("ITMATCH_FAIL_AT_EPOCH", "").strip()  # empty: unset, as before
    fail_at = _positive_int("ITMATCH_FAIL_AT_EPOCH", raw_fail) if raw_fail else None
    points = [p.strip() for p in env.get("ITMATCH_HOLD_AT", "").split(",") if p.strip()]
    hold_at = frozenset(_hold_point(p, env["ITMATCH_HOLD_AT"]) for p in points)
    hold_dir = env.get("ITMATCH_HOLD_DIR") or None
    if hold_at and hold_dir is None:
        raise ConfigError(f"ITMATCH_HOLD_AT={env['ITMATCH_HOLD_AT']!r} needs ITMATCH_HOLD_DIR (the folder for the "
                          "hold's pid and .go files), which is not set")
    return FaultInjection(fail_at, hold_at, Path(hold_dir) if hold_dir else None,
                          _hold_timeout(env.get("ITMATCH_HOLD_TIMEOUT_S", "600")))


def _hold_timeout(raw: str) -> float:
    """ITMATCH_HOLD_TIMEOUT_S: seconds > 0 (nan or inf would hold forever or never)."""
    try:
        timeout = float(raw)
    except ValueError:
        timeout = math.nan
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"ITMATCH_HOLD_TIMEOUT_S={raw!r}: not a number of seconds > 0")
    return timeout


def _positive_int(name: str, raw: str, whole: str = "") -> int:
    """`raw` as an int >= 1, else ConfigError naming `name` and its value (`whole`, where `raw` is a
    part of it)."""
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        said = f"{name}={whole!r}: {raw!r} is" if whole else f"{name}={raw!r}:"
        raise ConfigError(f"{said} not a whole number >= 1 (epochs and steps count from 1)")
    return value


def _hold_point(point: str, raw: str) -> tuple[int, int]:
    """One EPOCH:STEP of ITMATCH_HOLD_AT (both counted from 1, as the loop counts them)."""
    epoch, sep, step = point.partition(":")
    if not sep:
        raise ConfigError(f"ITMATCH_HOLD_AT={raw!r}: {point!r} is not EPOCH:STEP (e.g. 2:1)")
    return _positive_int("ITMATCH_HOLD_AT", epoch, raw), _positive_int("ITMATCH_HOLD_AT", step, raw)


def _maybe_inject_failure(started_at: int, epoch: int) -> None:
    """Fault injection for tests and drills: ITMATCH_FAIL_AT_EPOCH=N kills a run that started before
    epoch N right after epoch N is checkpointed (a resumed run passes)."""
    if not os.environ.get("ITMATCH_FAIL_AT_EPOCH"):
        return
    fail_at = fault_injection().fail_at
    if fail_at is not None and started_at < fail_at == epoch:
        raise RuntimeError(f"injected failure after epoch {epoch} (ITMATCH_FAIL_AT_EPOCH)")


def _maybe_hold(epoch: int, step: int, rank: int) -> None:
    """Fault injection for tests and drills: with ITMATCH_HOLD_AT=E:S[,E:S...] and ITMATCH_HOLD_DIR=D,
    every worker, right after step S of epoch E, writes its pid to D/hold-E-S.rank<R>.pid and waits
    until D/hold-E-S.go exists (at most ITMATCH_HOLD_TIMEOUT_S, default 600, then it fails), so a test
    can kill a worker or a node mid-epoch, or stop a service, at a known point. Once the .go file
    exists the point no longer holds: a restarted worker replaying the epoch passes it."""
    if not os.environ.get("ITMATCH_HOLD_AT"):  # every step passes here: no parsing unless asked
        return
    faults = fault_injection()
    if (epoch, step) not in faults.hold_at:
        return
    folder = faults.hold_dir
    go = folder / f"hold-{epoch}-{step}.go"
    if go.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    pid_file = folder / f"hold-{epoch}-{step}.rank{rank}.pid"
    pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
    pid_file.with_suffix(".tmp").replace(pid_file)  # the test never reads half a pid
    deadline = time.monotonic() + faults.hold_timeout_s
    while not go.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"held after step {step} of epoch {epoch} and {go} never appeared (ITMATCH_HOLD_AT)")
        time.sleep(0.05)


def _tracker(tracking: dict):
    from trainers.metrics_log import MetricsLog

    return MetricsLog(tracking)


def _system_monitor(cfg: Config, ctx: WorkerContext, tracking: Optional[dict]):
    """This node's system metrics into the run (tracking.system_metrics): one monitor per node, in
    its first worker; named by node when the job spans nodes, so nodes do not overwrite each other."""
    if not (cfg.tracking.system_metrics and tracking and ctx.local_rank == 0):
        return None
    from trainers.tracking import start_system_metrics

    return start_system_metrics(tracking, cfg.tracking.system_metrics_interval_s,
                                f"node{ctx.node_rank}" if ctx.spans_nodes else None)


def _ray_report(metrics: dict[str, Any], save) -> None:
    import ray.train

    if save is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save(Path(folder))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_loop_per_worker(config: dict) -> None:
    """Entry point for `TorchTrainer`: config = {"cfg": Config dict, "store": folder, "threads", "tracking",
    "run_dir"}."""
    import ray.train

    setup_logging()
    torch.set_num_threads(int(config.get("threads", 1)))
    cfg = validate(config["cfg"])
    quiet_ray_reports(cfg.run.ray_log_level)
    store = open_store(config["store"])
    trainer = Trainer(cfg, store, worker_context(cfg.scaling.use_gpu), config.get("tracking"))
    _resume(trainer, ray.train.get_checkpoint(), Path(config["run_dir"]) if config.get("run_dir") else None)
    trainer.fit(_ray_report)


def _resume(trainer: Trainer, checkpoint, run_dir: Optional[Path]) -> None:
    """Restore from the newest intact checkpoint: the one Ray lists, or one beside it in the run folder
    that is newer (Ray registers reports asynchronously) or intact where Ray's is truncated or corrupt."""
    if checkpoint is None:
        if not _restore_newest(trainer, None, run_dir) and trainer.cfg.run.start_from:
            trainer.start_from(Path(trainer.cfg.run.start_from))
            log.info("rank %d started from %s at epoch %d with optim.lr=%g", trainer.ctx.rank,
                     trainer.cfg.run.start_from, trainer.state.epoch, trainer.cfg.optim.lr)
        return
    with checkpoint.as_directory() as folder:  # a download for remote storage: restore inside it
        _restore_newest(trainer, Path(folder), Path(checkpoint.path).parent)  # not a local dir: no siblings


def _restore_newest(trainer: Trainer, listed: Optional[Path], run_folder: Optional[Path]) -> bool:
    """True if a checkpoint was restored."""
    from itmatch.state import CheckpointError, checkpoint_candidates, pick_resume_checkpoint, set_aside

    candidates = [p for p in checkpoint_candidates(listed, run_folder)
                  if p == listed or (p / "state.pt").is_file()]  # a folder Ray made but never filled
    if not candidates:
        return False
    try:
        chosen, skipped = pick_resume_checkpoint(candidates)
    except CheckpointError as exc:
        if listed is not None:
            raise
        # e.g. killed in its first save; rank 0 moves them aside (one rename each), the others read on
        kept = set_aside(candidates, run_folder) if trainer.ctx.rank == 0 and run_folder is not None else None
        log.warning("rank %d: starting over: %s%s", trainer.ctx.rank, exc,
                    f" (those checkpoints are kept in {kept})" if kept else "")
        return False
    for bad, why in skipped:
        log.warning("rank %d: checkpoint %s is unusable (%s); resuming from %s instead",
                    trainer.ctx.rank, bad, why, chosen)
    if chosen != listed:
        log.warning("rank %d: resuming from %s, newer than or in place of the checkpoint Ray lists (%s)",
                    trainer.ctx.rank, chosen, listed)
    trainer.restore(chosen)
    log.info("rank %d resumed at epoch %d, step %d, best %s", trainer.ctx.rank, trainer.state.epoch,
             trainer.state.step, trainer.state.best_metric)
    return True
