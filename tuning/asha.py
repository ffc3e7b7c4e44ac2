"""ASHA whose rungs survive a restored search.

`Tuner.restore` brings back a search's trials and its searcher, but the scheduler comes from the
Tuner pickled when the search began: its rungs are empty. After a kill and a restore, the first
trial to reach a rung would pass it unopposed, however weak, and run to the end. This ASHA writes
its rung records (trial id -> score at each milestone) to a JSON file beside the search after every
result it takes (written to a temporary name, then renamed), and reads them back when Tune hands
it the metric, which Tune does at every start, fresh or restored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from ray.tune.schedulers import AsyncHyperBandScheduler

from itmatch.files import atomic_write_text

log = logging.getLogger("itmatch.tune")
RUNGS_FILE = "asha_rungs.json"


def rungs_path(folder: Path) -> Path:
    """Where a search in `folder` keeps its ASHA rungs."""
    return folder / RUNGS_FILE


class RestorableASHA(AsyncHyperBandScheduler):
    """`AsyncHyperBandScheduler` plus its rung records in `state_path` (None: kept in memory only)."""

    def __init__(self, state_path: Optional[Path] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state_path = str(state_path) if state_path else None

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec: Any) -> bool:
        accepted = super().set_search_properties(metric, mode, **spec)
        self._load()
        return accepted

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def rungs(self) -> list[list[list]]:
        """Per bracket, [milestone, {trial id: score}] from the highest milestone down (ASHA's order)."""
        return [[[milestone, dict(recorded)] for milestone, recorded in bracket._rungs] for bracket in self._brackets]

    def _save(self) -> None:
        if not self.state_path:
            return
        atomic_write_text(self.state_path, json.dumps({"rungs": self.rungs()}))

    def _load(self) -> None:
        path = Path(self.state_path) if self.state_path else None
        if not path or not path.is_file():
            return
        saved = json.loads(path.read_text())["rungs"]
        mine = [[m for m, _ in bracket._rungs] for bracket in self._brackets]
        if [[m for m, _ in rungs] for rungs in saved] != mine:
            log.warning("%s holds rungs at other milestones than this search's ASHA (%s): not restored", path, mine)
            return
        for bracket, rungs in zip(self._brackets, saved):
            for (_, recorded), (_, scores) in zip(bracket._rungs, rungs):
                recorded.update(scores)
        count = sum(len(scores) for rungs in saved for _, scores in rungs)
        log.info("ASHA: %d rung record(s) restored from %s", count, path)
