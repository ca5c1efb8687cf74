"""Peak resident memory of this process and every Ray worker on this machine, sampled in a thread."""

from __future__ import annotations

import logging
import os
import threading

try:
    import psutil
except ImportError:
    # Ray vendors psutil in ray/thirdparty_files and puts that folder on sys.path when imported.
    import ray  # noqa: F401
    import psutil

logger = logging.getLogger(__name__)


def _is_ray_process(process: psutil.Process) -> bool:
    try:
        name = process.name()
        command = " ".join(process.cmdline()[:2])
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return name.startswith("ray::") or "raylet" in command or "gcs_server" in command or "ray::" in command


class PeakRSS:
    """Context manager that records the peak of (driver RSS + summed RSS of Ray processes).

    Ray processes are the children of this driver's process tree whose name starts with ``ray::``
    (workers and actors) plus the raylet and GCS server. Sampling runs every ``interval_s``
    seconds, so a peak shorter than that can be missed.
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.driver_peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._driver = psutil.Process(os.getpid())

    def _sample(self) -> None:
        while not self._stop.is_set():
            driver = self._driver.memory_info().rss
            total = driver
            for child in self._driver.children(recursive=True):
                if _is_ray_process(child):
                    try:
                        total += child.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
            self.driver_peak_bytes = max(self.driver_peak_bytes, driver)
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
