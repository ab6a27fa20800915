"""Progress bars that stay readable in a log: tqdm on a terminal; written to a file or a pipe (nohup, a job
scheduler, sweep.py's logs), one plain line every `INTERVAL_S` (nothing for a loop that ends sooner), as a
bar's carriage-return frames would pile up into one endless line there."""
from __future__ import annotations

import io
import sys
from collections.abc import Iterable

from tqdm import tqdm

INTERVAL_S = 30.0


class _Lines(io.TextIOBase):
    """tqdm's output stream off a terminal: each refresh becomes a line of its own."""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        return len(text)


def progress(iterable: Iterable, desc: str, enabled: bool = True, **kwargs) -> tqdm:
    """`tqdm(iterable, desc=desc, **kwargs)` for a terminal, plain lines elsewhere; `enabled=False` (a
    non-zero rank under torchrun) shows nothing."""
    if not sys.stderr.isatty():
        return tqdm(iterable, desc=desc, file=_Lines(), mininterval=INTERVAL_S, delay=INTERVAL_S, ascii=True,
                    ncols=100, disable=not enabled, **{**kwargs, "leave": True})
    return tqdm(iterable, desc=desc, dynamic_ncols=True, disable=not enabled, **{"leave": False, **kwargs})
