"""What ``keep`` may be: tokens per image (int), a fraction of them (float), or an energy budget.

`EnergyKeep` asks each image for the shortest prefix of ResPrune's picks that retains a share
``energy`` of its token energy, clamped to ``[min, max]`` tokens (`resprune.adaptive` selects
it). This module is torch-free: the job spec validates keep values with it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EnergyKeep:
    """Per image, the fewest tokens that retain ``energy`` of its energy, within [min, max]."""

    energy: float  # tau in (0, 1]; 1 keeps max
    min: int = 16
    max: int = 192

    def __post_init__(self) -> None:
        problem = energy_keep_problem(self.energy, self.min, self.max)
        if problem:
            raise ValueError(problem)

    def __str__(self) -> str:
        return f"energy={self.energy:g},min={self.min},max={self.max}"


def energy_keep_problem(energy: object, lo: object, hi: object) -> str | None:
    """Why (energy, min, max) is not an energy budget, in one line naming the key; or None."""
    if isinstance(energy, bool) or not isinstance(energy, int | float) or not 0 < energy <= 1:
        return f"keep.energy must be a number in (0, 1] (the share of energy kept), got {energy!r}"
    for name, value in (("min", lo), ("max", hi)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"keep.{name} must be an int >= 1 (tokens per image), got {value!r}"
    if lo > hi:  # type: ignore[operator]
        return f"keep.min must be <= keep.max, got min={lo} > max={hi}"
    return None
