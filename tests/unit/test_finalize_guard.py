"""A model whose best weights embed test rows as NaN/inf is not logged or registered: retrieval ranks
such rows last, but without the check the run would still finish, register and maybe take the alias."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainers.job import Diverged, check_finite


def test_non_finite_embeddings_stop_the_run_before_logging():
    img, txt = torch.randn(4, 8), torch.randn(20, 8)
    check_finite(Path("best"), (img, txt), "test")
    img[1, 3] = float("nan")
    txt[[2, 7]] = float("inf")
    with pytest.raises(Diverged) as err:
        check_finite(Path("best"), (img, txt), "test")
    assert "1 of 4 image rows, 2 of 20 caption rows of the test split" in str(err.value)
