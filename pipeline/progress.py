"""One progress bar for every long command: live on a terminal, a few plain lines in a log.

On a terminal tqdm redraws one line in place. Written to a file or a CI log, those redraws pile up
as one endless line of carriage returns, so there the bar prints a complete line only when at
least 10 % more is done *and* at least 10 s have passed since the last line (plus the first and the
last line): a two-hour job logs about ten lines, a ten-second one two.
"""

from __future__ import annotations

import sys
from typing import IO

LOG_INTERVAL_S = 10.0
LOG_STEP = 0.10
_LOG_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Lines:
    """File adapter for logs: each tqdm redraw ('\\r' + status + padding) becomes one line."""

    def __init__(self, file: IO[str]):
        self._file = file
        self._last = ""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text and text != self._last:  # closing redraws the last status once more
            self._file.write(text + "\n")
            self._last = text

    def flush(self) -> None:
        self._file.flush()


class _Silent:
    """The bar of a quiet run: the same calls, no output, and tqdm not even imported (it reads its
    own version through importlib.metadata: 30 ms of every quiet pack's start-up here)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(total: int | None, desc: str, quiet: bool = False, unit: str = "clip", file: IO[str] | None = None):
    """A tqdm bar on stderr (or `file`) with rate and ETA; `quiet` silences it entirely."""
    file = sys.stderr if file is None else file
    if quiet:
        return _Silent()
    from tqdm import tqdm

    isatty = getattr(file, "isatty", lambda: False)()
    if isatty:
        return tqdm(total=total, desc=desc, unit=unit, file=file, mininterval=0.2, dynamic_ncols=True)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=_Lines(file),
        bar_format=_LOG_FORMAT,
        mininterval=LOG_INTERVAL_S,
        miniters=max(1, int((total or 0) * LOG_STEP)),
        maxinterval=float("inf"),  # tqdm's monitor thread would otherwise force a redraw every 10 s
        ascii=True,
    )
