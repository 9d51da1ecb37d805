"""Peak resident memory of a job's processes (Beam SDK workers, Dask workers, Ray actors), polled by name."""

from __future__ import annotations

import threading

import psutil


class PeakRss:
    """Polls the resident memory of processes whose command line contains one of ``names``: the peak of any
    one such process per name. For a name in ``with_children`` a process counts with its descendants (a Dask
    worker is a nanny process and the worker it spawns)."""

    def __init__(self, names: tuple[str, ...], *, with_children: tuple[str, ...] = (), every_s: float = 0.5):
        self.names, self.with_children, self.every_s = names, with_children, every_s
        self.peak = dict.fromkeys(names, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _rss(self, process: psutil.Process, name: str) -> int:
        family = [process] + (process.children(recursive=True) if name in self.with_children else [])
        total = 0
        for p in family:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # exited between the listing and the read
                pass
        return total

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            for p in psutil.process_iter(["cmdline"]):
                line = " ".join(p.info["cmdline"] or ())
                for name in self.names:
                    if name in line:
                        try:
                            self.peak[name] = max(self.peak[name], self._rss(p, name))
                        except psutil.Error:
                            pass

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
