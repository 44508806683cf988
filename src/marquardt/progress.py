"""Live training progress: one updating line (tqdm), never a flood of lines in logs."""

from __future__ import annotations

import math
from typing import Any


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def resolve_progress(progress: bool | None) -> bool:
    """Whether ``fit`` shows progress, decided before any work starts.

    ``None`` (the default) shows it when standard output is a terminal and tqdm (an optional
    extra) is installed; ``True`` without tqdm is an ImportError that says how to install it.
    """
    import sys

    if progress is False:
        return False
    if progress is None and not sys.stdout.isatty():
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError as error:
        if progress is None:
            return False
        raise ImportError("progress=True needs tqdm: pip install tqdm (or marquardt[progress]).") from error
    return True


class ProgressDisplay:
    """A tqdm bar over epochs whose postfix shows performance, validation, damping and gradient.

    Call it with each epoch record; ``close()`` at the end. tqdm is imported lazily.
    """

    def __init__(self, total: int, *, file: Any = None) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("progress=True needs tqdm: pip install tqdm (or marquardt[progress]).") from error
        self._bar = tqdm(total=total, unit="epoch", file=file, dynamic_ncols=True, leave=True)

    def __call__(self, record: dict) -> None:
        if record["epoch"] > self._bar.n:
            self._bar.update(record["epoch"] - self._bar.n)
        self._bar.set_postfix_str(
            f"perf={_fmt(record['perf'])} val={_fmt(record.get('vperf'))} "
            f"mu={_fmt(record.get('damping'))} grad={_fmt(record.get('gradient'))}",
            refresh=False,
        )

    def close(self) -> None:
        self._bar.close()
