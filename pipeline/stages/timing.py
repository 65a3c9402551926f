"""The model actor's device clock: model seconds, apart from compile-and-capture seconds."""

from __future__ import annotations

import time


class DeviceClock:
    """Times model work with the device synchronised; compile and capture time (counted by
    `resprune.overhead`) goes to ``compile_s``, never to ``busy_s`` or an item's seconds."""

    def __init__(self, device: str):
        self.device = device
        self.busy_s, self.compile_s = 0.0, 0.0

    def start(self) -> tuple[float, float]:
        """Synchronise the device and start the clock (and the compile-and-capture count)."""
        from resprune import overhead

        self._sync()
        return time.perf_counter(), overhead.seconds()

    def stop(self, started: tuple[float, float]) -> float:
        """Synchronise the device, stop the clock; returns the model seconds since ``started``:
        compile and capture seconds in between count as ``compile_s``, the rest as busy."""
        from resprune import overhead

        self._sync()
        wall, compiled = time.perf_counter() - started[0], overhead.seconds() - started[1]
        seconds = max(0.0, wall - compiled)
        self.busy_s += seconds
        self.compile_s += compiled
        return seconds

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
