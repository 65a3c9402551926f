"""`python -m pipeline tiny PATH [--family llava]`: a tiny random-weight checkpoint to try jobs.

Writes a hub-layout folder (config, safetensors weights, tokenizer, processor) of a few MB,
built offline by `resprune.tiny`, then point a spec at it: ``--set model.path=PATH --set
execution.gpus_per_actor=0``. Its answers are random text (the weights are random); it is
for trying the machinery (specs, storage, Ray, resume, reports), not quality.
"""

from __future__ import annotations

import argparse

FAMILIES = ("llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "gemma3", "internvl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """PATH and --family."""
    parser.add_argument("path", help="folder to write the checkpoint to")
    parser.add_argument("--family", choices=FAMILIES, default="llava", help="model family")


def main(args: argparse.Namespace) -> int:
    """Build the checkpoint and print how to use it."""
    from resprune.tiny import build_tiny_checkpoint

    folder = build_tiny_checkpoint(args.family, args.path)
    print(
        f"wrote a tiny random-weight {args.family} checkpoint to {folder}; try it with "
        f"--set model.path={folder} --set execution.gpus_per_actor=0"
    )
    return 0
