"""A progress bar of a reading on stderr, shown only when stderr is a terminal."""

import os
import resource
import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text


def peak_rss_bytes() -> int:
    """The most memory this process has had resident."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def rss_bytes() -> int:
    """Memory in use by this process (resident set); its peak where no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


class _Eta(TimeRemainingColumn):
    def render(self, task):
        return Text("eta ", style="progress.remaining") + super().render(task)


def _field(template: str, width: int) -> TextColumn:
    return TextColumn(template, justify="right", table_column=Column(min_width=width, no_wrap=True))


def _columns(width: int):
    """The columns that fit ``width``: a narrow terminal loses the least wanted."""
    wanted = [  # most wanted first: (place, width, column)
        (2, 4, TaskProgressColumn()),
        (3, 10, _field("{task.fields[tokens]:,} tok", 10)),
        (4, 11, _field("{task.fields[rate]:,.0f} tok/s", 11)),
        (7, 11, _Eta()),
        (6, 7, TimeElapsedColumn()),
        (5, 7, _field("{task.fields[mib]:,.0f} MiB", 7)),
    ]
    room = width - 1  # the last column stays clear of the edge
    chosen = []
    for place, w, column in wanted:
        if w + 1 <= room:
            chosen.append((place, column))
            room -= w + 1
    if room >= 11:
        bar = min(30, room - 1)
        chosen.append((1, BarColumn(bar_width=bar)))
        room -= bar + 1
    if room >= 9:
        column = Column(max_width=min(24, room - 1), no_wrap=True, overflow="ellipsis")
        chosen.append((0, TextColumn("{task.description}", table_column=column)))
    return [column for _, column in sorted(chosen, key=lambda c: c[0])]


class ReadProgress:
    """``progress(tokens, bytes_done, bytes_total)`` for ``InfiniSession.read``.

    Shows the share read, tokens, tokens/s, memory in use, elapsed time and an
    estimate of the time left, in one line that fits the terminal.
    """

    def __init__(self, name: str, stream=None, enabled=None):
        stream = stream or sys.stderr
        self.enabled = stream.isatty() if enabled is None else enabled
        self.name = self.description = name
        self.console = Console(file=stream, force_terminal=self.enabled or None)
        self.bar = None

    def __call__(self, tokens: int, done: int, total: int):
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.bar is None:  # timed from the first call: loading the model does not count
            self.first, self.start, self.last = tokens, now, now
            self.bar = Progress(
                *_columns(self.console.width), console=self.console,
                auto_refresh=False, redirect_stdout=False,
            )
            self.task = self.bar.add_task(self.description, total=max(total, 1), tokens=tokens, rate=0.0,
                                          mib=rss_bytes() / 2**20, completed=done)
            self.bar.start()
            return
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        done = max(done, self.bar.tasks[0].completed)  # the estimate within a piece may overshoot
        rate = (tokens - self.first) / max(now - self.start, 1e-9)
        self.bar.update(
            self.task, completed=done, tokens=tokens, rate=rate, mib=rss_bytes() / 2**20, refresh=True
        )

    def phase(self, text: str):
        """Show what is going on besides reading, e.g. which note is being written."""
        self.description = f"{self.name}: {text}"
        if self.enabled and self.bar is not None:
            self.bar.update(self.task, description=self.description, refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
