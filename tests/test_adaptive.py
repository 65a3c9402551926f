"""Energy budgets (`pruning.keep: {energy, min, max}`): the chosen k, its picks, the spec.

The picks are the fixed-k picks at the chosen k; k is the shortest prefix that retains tau of
the image's energy, clamped to [min, max]; one selector call; batch-independent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.spec import SpecError, fingerprint, parse_spec
from resprune.adaptive import max_kept, select_by_energy
from resprune.answer import answer_batch
from resprune.budget import ImageTokens, kept_index, kept_rows, select_within_budget
from resprune.keep import EnergyKeep
from resprune.models.base import Crop
from resprune.pruners import TokenSet, build_pruner
from resprune.select import select_prefixes
from tests.test_budget import MIXED, CountedPruner, llava_next_like

N, D = 576, 64
ASSETS = Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "images"


def _image(tokens: torch.Tensor, key: str) -> ImageTokens:
    return ImageTokens(tokens, [Crop(torch.arange(tokens.shape[0]), (24, 24))], key=key)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


TEXTURED = _image(torch.randn(N, D, generator=_g(0)), "textured")
BLANK = _image(torch.ones(N, D), "blank")
TILED = _image(torch.randn(4, D, generator=_g(1))[torch.arange(N) % 4], "tiled")
ZERO = _image(torch.zeros(N, D), "zero")


def _indices(picks) -> list[int]:
    return sorted(kept_index(picks).tolist())


@pytest.mark.parametrize("energy", [0.3, 0.8, 0.95])
def test_picks_are_the_fixed_k_picks_truncated_at_the_chosen_k(energy):
    keep = EnergyKeep(energy, 2, 400)
    pruner = build_pruner("resprune")
    (picks,) = select_by_energy(pruner, keep, [TEXTURED])
    k = len(_indices(picks))
    (fixed,) = select_within_budget(pruner, k, [TEXTURED])
    assert _indices(picks) == _indices(fixed)
    (longest,) = select_prefixes(TEXTURED.features[None], [keep.max])
    assert _indices(picks) == sorted(longest.order[:k].tolist())
    curve = longest.retained_by_prefix  # k is the shortest prefix reaching the share
    assert curve[k - 1] >= energy and (k == 1 or curve[k - 2] < energy)
    assert picks[0][2].retained_energy == pytest.approx(float(curve[k - 1]))


def test_blank_and_tiled_images_get_min_and_a_textured_one_more():
    keep = EnergyKeep(0.95, 16, 192)
    out = select_by_energy(build_pruner("resprune"), keep, [BLANK, TILED, ZERO, TEXTURED])
    kept = [len(_indices(p)) for p in out]
    assert kept[:3] == [16, 16, 16] and 16 < kept[3] < 192


def test_energy_one_keeps_max_and_low_energy_keeps_min():
    pruner = build_pruner("resprune")
    for image in (BLANK, TEXTURED):
        (full,) = select_by_energy(pruner, EnergyKeep(1.0, 16, 100), [image])
        assert _indices(full) == _indices(select_within_budget(pruner, 100, [image])[0])
        (low,) = select_by_energy(pruner, EnergyKeep(1e-6, 16, 100), [image])
        assert len(_indices(low)) == 16


def test_one_selector_call_and_batch_independence():
    keep = EnergyKeep(0.9, 3, 40)
    blank = _image(torch.ones(N, 12), "blank-12")
    images = [MIXED[0], blank, *MIXED[1:], _image(TILED.features[:, :12], "tiled-12")]
    counted = CountedPruner(build_pruner("resprune"), True)
    together = select_by_energy(counted, keep, images)
    assert counted.calls == 1
    for image, picks in zip(images, together, strict=True):
        (alone,) = select_by_energy(build_pruner("resprune"), keep, [image])
        assert _indices(alone) == _indices(picks)
    mixed = select_by_energy(build_pruner("resprune"), keep, images[::-1])
    assert [_indices(p) for p in mixed] == [_indices(p) for p in together[::-1]]


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_llava_next_crops_fit_the_items_cap_with_their_newlines(energy):
    keep = EnergyKeep(energy, 10, 30)
    pruner = build_pruner("resprune")
    images = MIXED[:3]
    for image, picks in zip(images, select_by_energy(pruner, keep, images), strict=True):
        kept = kept_index(picks)
        used = len(kept) + len(kept_rows(image, kept))
        assert used <= keep.max
        clamped = [select_within_budget(pruner, t, [image])[0] for t in (keep.min, keep.max)]
        if used < keep.min or used == keep.max or energy == 1:  # a clamped item: fixed min / max
            assert any(_indices(picks) == _indices(c) for c in clamped)
            continue
        for _, tokens, pruned in picks:  # within the cap: each crop's energy prefix
            (alone,) = pruner.prune([tokens], [len(pruned.indices)])
            assert torch.equal(pruned.indices, alone.indices)
            curve = alone.retained_by_prefix
            assert len(curve) == 1 or curve[-2] < energy


def test_crops_that_need_few_tokens_keep_few_within_the_cap():
    image = llava_next_like(7, 4, [(4, 4), (4, 4)])
    flat = image.features.clone()
    for crop in image.crops[1:]:  # the tiles repeat one token: energy is reached at once
        flat[crop.index] = flat[crop.index[0]].clone()
    image = ImageTokens(flat, image.crops, image.newline_rows, key="flat-tiles")
    (picks,) = select_by_energy(build_pruner("resprune"), EnergyKeep(0.9, 1, 40), [image])
    per_crop = [len(p.indices) for _, _, p in picks]
    assert per_crop[1:] == [1, 1] and per_crop[0] > 1


def test_upper_bound_for_packing_and_the_none_pruner():
    assert max_kept(EnergyKeep(0.9, 16, 192), 576) == 192
    assert max_kept(EnergyKeep(0.9, 16, 192), 100) == 100
    assert max_kept(64, 576) == 64 and max_kept(0.5, 576) == 288
    (picks,) = select_by_energy(build_pruner("none"), EnergyKeep(0.9, 16, 192), [TEXTURED])
    assert len(_indices(picks)) == N


def test_baselines_without_retained_energy_per_prefix_are_refused():
    with pytest.raises(ValueError, match="prefix-consistent"):
        select_by_energy(build_pruner("uniform"), EnergyKeep(0.9), [TEXTURED])


def test_divprune_carries_its_prefix_energies_into_energy_budgets():
    """DivPrune's picks come with each prefix's retained energy: the shortest prefix that
    reaches the energy is kept, as for ResPrune."""
    pruner = build_pruner("divprune")
    (picks,) = select_by_energy(pruner, EnergyKeep(0.9, 1, 100), [TEXTURED])
    k = len(_indices(picks))
    full = pruner.prune([TokenSet(TEXTURED.features)], [100])[0]
    curve = full.retained_by_prefix.numpy()
    assert curve[k - 1] >= 0.9 and (k == 1 or curve[k - 2] < 0.9)


def test_through_answer_batch_on_a_tiny_llava(tmp_path_factory):
    from tests.vlm_helpers import tiny_vlm

    vlm, pre = tiny_vlm("llava", tmp_path_factory)
    lines = np.zeros((336, 336, 3), np.uint8)
    lines[::28], lines[:, ::28] = 255, 255
    pictures = {
        "blank": Image.new("RGB", (336, 336), (128, 128, 128)),
        "tiled": Image.fromarray(lines),
        "photo": Image.open(ASSETS / "astronaut.jpg").convert("RGB"),
    }
    items = [pre.prepare(im, "What is it?") for im in pictures.values()]
    kw = {"pruner": build_pruner("resprune"), "max_new_tokens": 1}
    got = answer_batch(vlm, items, keep=EnergyKeep(0.9, 4, 64), **kw)
    kept = dict(zip(pictures, (r.kept_tokens for r in got), strict=True))
    assert kept["blank"] == kept["tiled"] == 4 and kept["photo"] > 4
    fixed = answer_batch(vlm, items[2:], keep=kept["photo"], **kw)[0]
    assert got[2].kept_indices == fixed.kept_indices and got[2].answer == fixed.answer
    assert answer_batch(vlm, items, keep=EnergyKeep(1.0, 4, 64), **kw)[0].kept_tokens == 64


MINIMAL = {"name": "x", "input": {"uri": "in"}, "model": {"path": "m"}, "output": {"uri": "o"}}


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ({"energy": 0}, "keep.energy must be a number in (0, 1]"),
        ({"energy": 1.5}, "keep.energy must be a number in (0, 1]"),
        ({"energy": 0.9, "min": 64, "max": 16}, "keep.min must be <= keep.max"),
        ({"energy": 0.9, "min": 0}, "keep.min must be an int >= 1"),
        ({"energy": 0.9, "max": 2.5}, "keep.max must be an int >= 1"),
        ({"min": 4}, "keep.energy is required"),
        ({"energy": 0.9, "tau": 1}, "unknown key(s) ['tau']"),
    ],
)
def test_bad_energy_budgets_fail_in_one_line_naming_the_key(keep, message):
    with pytest.raises(SpecError) as err:
        parse_spec(MINIMAL | {"pruning": {"keep": keep}})
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].startswith("  - pruning.keep: ") and message in lines[0]


def test_energy_budgets_parse_and_change_the_fingerprint():
    spec = parse_spec(MINIMAL | {"pruning": {"keep": {"energy": 0.95}}})
    assert spec.pruning.keep_value == EnergyKeep(0.95, 16, 192)
    assert str(spec.pruning.keep_value) == "energy=0.95,min=16,max=192"
    prints = {
        fingerprint(parse_spec(MINIMAL | {"pruning": {"keep": keep}}))
        for keep in ({"energy": 0.95}, {"energy": 0.9}, {"energy": 0.95, "max": 128}, 192)
    }
    assert len(prints) == 4
    with pytest.raises(SpecError, match="needs method resprune"):
        parse_spec(MINIMAL | {"pruning": {"method": "random", "keep": {"energy": 0.9}}})
