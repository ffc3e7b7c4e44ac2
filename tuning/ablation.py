"""An ablation table: rows of config variants, each trained with several seeds, reported with the
spread, so a difference can be told from seed noise.

    python -m tuning.ablation configs/ablation/flickr8k.yaml [--name NAME] [--max-concurrent C] [key=value ...]

The table file names the preset every row starts from, the seeds, and the rows (dotted overrides,
the same keys as the CLI and Tune):

    config: configs/flickr8k_precomp.yaml
    seeds: [0, 1, 2]
    overrides: {train.epochs: 20}      # optional, for every row (the command line's come last)
    rows:
      full: {}
      linear branches: {model.branch: linear}

Every row is validated before Ray starts (an error names the row and the key). Each (row, seed) is a
normal job (`trainers.job.run_job`): its folder `runs/<name>/runs/<row>-seed<k>`, an MLflow run nested
under the table's parent run; finished ones are read back when the command is run again. The table
(test R@K, rsum mean ± sample std, validation rsum, the difference to the first row and whether it
is larger than the spread) is printed and written as `runs/<name>/ablation.md` and `ablation.json`,
both logged to the parent run. Nothing is registered.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see trainers/train.py)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

from itmatch.config import Config, ConfigError, flatten, load_config, read_overrides, read_yaml  # noqa: E402
from itmatch.data.sources import DataError  # noqa: E402
from trainers.logs import setup_logging  # noqa: E402
from tuning import rerun, select  # noqa: E402
from tuning.space import check_same_store  # noqa: E402

TABLE_SETS = {"train.seed": "seeds:", "run.name": "the table (--name names its folder and runs)",
              "tracking.registered_model": "the table (an ablation registers nothing)",
              "tracking.log_model": "the table (its runs log no model)", "eval.plots": "the table (its runs draw none)"}
"""What tuning.rerun.rerun_config sets for every (row, seed) run, and who: given for every row (the
table's overrides:, the command line) it was dropped without a word."""
ROWS_MAY_NOT_SET = (*TABLE_SETS, "run.storage_path")
"""A row may not set these either; for every row run.storage_path places the table's folder."""
RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def load_table(path: str | Path, extra: list[str]) -> tuple[Config, dict[str, dict], list[int]]:
    """The base config (the table's preset + its overrides + the command line's) and the rows, each
    checked against it. A row name becomes a folder name, so it is slugged."""
    spec = read_yaml(path) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping with rows: (and seeds:, overrides:), got {type(spec).__name__}")
    unknown = sorted(set(spec) - {"config", "rows", "seeds", "overrides"}, key=str)
    if unknown:  # a misspelt `seed:` would otherwise leave the default seeds without a word
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; the keys are config, rows, seeds, overrides")
    rows, seeds, common = spec.get("rows"), spec.get("seeds", [0]), spec.get("overrides") or {}
    if not isinstance(rows, dict) or not rows or not all(isinstance(v, dict) or v is None for v in rows.values()):
        raise ConfigError(f"{path}: rows: expected a mapping of row name -> {{dotted key: value}}, got {rows!r}")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                          and 0 <= s < 2**31 for s in seeds):
        raise ConfigError(f"{path}: seeds: expected a list of integers 0 .. 2**31-1 (train.seed's range), "
                          f"got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds: {seeds!r} repeats a seed (its runs would share one folder)")
    if not isinstance(common, dict):
        raise ConfigError(f"{path}: overrides: expected a mapping of dotted key -> value, got {common!r}")
    if not isinstance(spec.get("config"), (str, type(None))):
        raise ConfigError(f"{path}: config: expected the path of a preset YAML file, got {spec['config']!r}")
    preset = spec.get("config")
    if preset is not None and not (preset.strip() and Path(preset).exists() and not Path(preset).is_dir()):
        # load_config said "config preset '...' does not exist" (or "'.' is a folder" for ''), naming
        # neither the table nor where a relative path is looked for
        raise ConfigError(f"{path}: config: {preset!r} is no preset file (a relative path is read from the working "
                          f"directory, {Path.cwd()}, not from the table's folder)")
    _check_row_names(path, rows)
    common = flatten(common, where=f"{path}: overrides")
    cli = read_overrides(extra)
    _check_not_table_set(f"{path}: overrides", common)
    _check_not_table_set("command line", cli)
    # as a mapping, not re-read from text: a JSON round trip failed on `!!binary`/`!!set` values
    # (TypeError) and made `experiment: yes` the name 'true' where a preset refuses the boolean
    base = load_config(spec.get("config"), {**common, **cli})
    rows = {row: flatten(overrides or {}, where=f"{path}: row {row!r}") for row, overrides in rows.items()}
    for row, overrides in rows.items():
        _check_row(path, base, row, overrides)
    return base, rows, seeds


def _check_not_table_set(where: str, overrides: dict[str, Any]) -> None:
    owned = next((key for key in overrides if key in TABLE_SETS), None)
    if owned:
        raise ConfigError(f"{where}: {owned} is set by {TABLE_SETS[owned]} for every run; leave it out")


def _check_row_names(path: str | Path, rows: dict) -> None:
    """Row names are text, one folder each. YAML reads `on`, `no`, `2`, `null` as a boolean, a number,
    None: refused here (quoted, they are names), since plan() slugs them after Ray has started."""
    folders: dict[str, str] = {}
    for row in rows:
        if not isinstance(row, str):
            raise ConfigError(f"{path}: rows: the row name {row!r} is read by YAML as {type(row).__name__}, not "
                              "text; quote it as the table spells it (e.g. 'on': or '2':)")
        other = folders.setdefault(slug(row), row)
        if other != row:
            raise ConfigError(f"{path}: rows {other!r} and {row!r} would share the run folders "
                              f"{slug(row)}-seed*; rename one")


def _check_row(path: str | Path, base: Config, row: str, overrides: dict) -> None:
    owned = next((k for k in overrides if k in ROWS_MAY_NOT_SET), None)
    if owned:  # tuning.rerun.rerun_config sets them for every run: the row's value would be dropped
        raise ConfigError(f"{path}: row {row!r}: {owned} is set by the table for every run (seeds: gives "
                          "the seeds; run names and folders are the table's); leave it out")
    try:
        cfg = load_config(None, {**base.flat(), **overrides})
    except ConfigError as exc:
        raise ConfigError(f"{path}: row {row!r}: {exc}") from exc
    check_same_store(base, cfg, f"{path}: row {row!r}")


def slug(row: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", row).strip("-").lower() or "row"


def plan(rows: dict[str, dict], seeds: list[int]) -> list[dict[str, Any]]:
    """One job per (row, seed), in row order; `trial_id` is the row (what tuning.rerun calls it)."""
    return [{"trial_id": row, "params": overrides, "seed": seed, "run": f"{slug(row)}-seed{seed}"}
            for row, overrides in rows.items() for seed in seeds]


def summarize(rows: dict[str, dict], records: list[dict], metric: str = "rsum") -> list[dict[str, Any]]:
    """Per row: mean and sample std over its finished seeds of every test recall, test rsum and the
    best validation score; the first row is the reference each difference is taken to."""
    table = []
    for row, overrides in rows.items():
        done = [r["summary"] for r in records if r["trial_id"] == row and r["summary"]]
        line: dict[str, Any] = {"row": row, "overrides": overrides, "seeds": len(done),
                                "failed": sum(1 for r in records if r["trial_id"] == row and not r["summary"])}
        for key in (*RECALLS, metric):
            line[key] = _mean_std([s["test"][key] for s in done])
        line["val"] = _mean_std([s[f"val_{metric}"] for s in done])
        table.append(line)
    ref = table[0][metric]
    for line in table:
        mean, std = line[metric]
        if ref[0] is None or mean is None:
            line["delta"], line["beyond_spread"] = None, None
            continue
        line["delta"] = mean - ref[0]
        # outside the seed noise: the difference exceeds both rows' standard deviations combined
        line["beyond_spread"] = abs(line["delta"]) > (std ** 2 + ref[1] ** 2) ** 0.5
    return table


def _mean_std(values: list[float]) -> tuple[Optional[float], float]:
    """select.spread's mean and sample std; a row with no finished seed has no mean, one seed no spread."""
    if not values:
        return None, 0.0
    mean, std = select.spread(values)
    return mean, std or 0.0


def markdown(table: list[dict[str, Any]], metric: str = "rsum") -> str:
    head = ("| row | overrides | seeds | i2t R@1/5/10 | t2i R@1/5/10 | test rsum (mean ± std) | val rsum | "
            f"Δ {metric} vs first row |")
    lines = [head, "|" + "---|" * 8]
    for t in table:
        if t[metric][0] is None:
            lines.append(f"| {t['row']} | {_overrides(t)} | 0 ({t['failed']} failed) | | | | | |")
            continue
        i2t = "/".join(f"{t[k][0]:.1f}" for k in RECALLS[:3])
        t2i = "/".join(f"{t[k][0]:.1f}" for k in RECALLS[3:])
        delta = "—" if t is table[0] else f"{t['delta']:+.1f}" + ("" if t["beyond_spread"] else " (within spread)")
        lines.append(f"| {t['row']} | {_overrides(t)} | {t['seeds']} | {i2t} | {t2i} | "
                     f"{t[metric][0]:.1f} ± {t[metric][1]:.1f} | {t['val'][0]:.1f} ± {t['val'][1]:.1f} | {delta} |")
    return "\n".join(lines) + "\n"


def _overrides(line: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in line["overrides"].items()) or "(the preset)"


def prepare_table(base: Config, rows: dict[str, dict], name: str, table: str | Path) -> tuple[Config, Any]:
    """The table's own config and feature store, checked as a job's are before anything starts
    (ConfigError / DataError in one line): the name, every row's batch (an error names the `table`
    file and the row), the MLflow store and names."""
    from trainers import preflight
    from trainers.job import absolute_paths
    from trainers.train import prepare_store

    cfg = absolute_paths(load_config(None, {**base.flat(), "run.name": name, "eval.pictures": False,
                                            "tracking.registered_model": None}))
    store = prepare_store(cfg)
    for row, overrides in rows.items():
        try:
            preflight.check_batch(load_config(None, {**cfg.flat(), **overrides}), store)
        except DataError as exc:
            raise DataError(f"{table}: row {row!r}: {exc}") from exc
    preflight.check_tracking(cfg)
    return cfg, store


def run_table(cfg: Config, store: Any, rows: dict[str, dict], seeds: list[int], name: str,
              max_concurrent: int) -> list[dict]:
    """Every (row, seed) as a job on one Ray session; the table under runs/<name>, in MLflow too."""
    from trainers.train import exit_on_sigterm, init_ray

    folder = Path(cfg.run.storage_path) / name
    folder.mkdir(parents=True, exist_ok=True)
    from trainers.in_process import can_run

    # Ray Train's worker groups (and so the dashboard's State API) if any row trains through one
    init_ray(cfg, worker_groups=not all(can_run(load_config(None, {**cfg.flat(), **o})) for o in rows.values()))
    exit_on_sigterm()  # again: Ray's driver installs its own SIGTERM handler, which aborts
    parent = _parent_run(cfg, folder, store, name)
    setup = {"base": cfg.flat(), "store": str(store.root.resolve()), "reruns_dir": str(folder / "runs"),
             "name": name, "parent_run_id": parent["run_id"] if parent else None}
    records = rerun.run_all(plan(rows, seeds), setup, max_concurrent)
    table = summarize(rows, records, cfg.train.metric)
    (folder / "ablation.json").write_text(json.dumps({"rows": table, "runs": records}, indent=2, default=str))
    (folder / "ablation.md").write_text(markdown(table, cfg.train.metric))
    if parent:
        _close_parent(parent, folder, records)
    return table


def _parent_run(cfg: Config, folder: Path, store, name: str) -> Optional[dict]:
    if not cfg.tracking.enabled:
        return None
    from trainers.tracking import start_run

    return start_run(cfg, str(folder), store, tags={"itmatch.ablation": name})


def _close_parent(parent: dict, folder: Path, records: list[dict]) -> None:
    from mlflow.tracking import MlflowClient

    from trainers.tracking import end_run

    client = MlflowClient(parent["tracking_uri"])
    for name in ("ablation.md", "ablation.json"):
        client.log_artifact(parent["run_id"], str(folder / name))
    end_run(parent, "FINISHED" if all(r["summary"] for r in records) else "FAILED")


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    from trainers.train import exit_on_sigterm

    exit_on_sigterm()
    p = argparse.ArgumentParser(prog="tuning.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="YAML: config (preset), seeds, overrides, rows")
    p.add_argument("--name", help="folder under run.storage_path and the parent MLflow run (default: the file's name)")
    p.add_argument("--max-concurrent", type=int, default=1, help="jobs at once")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every row (after the table's own)")
    args = p.parse_intermixed_args(argv)  # the table, flags and overrides in any order
    name = Path(args.table).stem if args.name is None else args.name  # `--name ""` is refused below, not the stem
    if args.max_concurrent < 1:
        print(f"error: --max-concurrent {args.max_concurrent}: must be at least 1", file=sys.stderr)
        return 2
    try:
        base, rows, seeds = load_table(args.table, args.overrides)
        cfg, store = prepare_table(base, rows, name, args.table)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        table = run_table(cfg, store, rows, seeds, name, args.max_concurrent)
    except ConfigError as exc:  # a Ray address that cannot be attached to (init_ray), before any row runs
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(table, base.train.metric))
    return 0 if all(t["failed"] == 0 for t in table) else 1


if __name__ == "__main__":
    sys.exit(main())
