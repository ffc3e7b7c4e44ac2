"""What the bad-input tests check of a refusal: one line (a DataError), holding what it must name."""

from __future__ import annotations

import pytest

from itmatch.data.sources import DataError


def refused(call, *needles: str) -> str:
    """`call()` raises a one-line DataError holding every needle; returns the message."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message
