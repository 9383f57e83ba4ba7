"""A one-line progress bar on stderr, shown only when stderr is a terminal."""

import os
import resource
import sys
import time


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


class ReadProgress:
    """``progress(tokens, bytes_done, bytes_total)`` for ``InfiniSession.read``."""

    def __init__(self, name: str, stream=None, enabled=None):
        self.name = name
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = self.last = time.perf_counter()
        self.first = None  # tokens at the first call, for a rate over this run only
        self.shown = False

    def __call__(self, tokens: int, done: int, total: int):
        now = time.perf_counter()
        if self.first is None:
            self.first, self.start = tokens, now
        if not self.enabled or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        rate = (tokens - self.first) / max(now - self.start, 1e-9)
        frac = done / total if total else 1.0
        bar = "#" * int(20 * frac)
        self.stream.write(
            f"\r{self.name} [{bar:<20}] {frac:4.0%}  {tokens:,} tokens  "
            f"{rate:,.0f} tokens/s  {rss_bytes() / 2**20:,.0f} MiB in use "
        )
        self.stream.flush()
        self.shown = True

    def close(self):
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False
