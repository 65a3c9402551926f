"""Make PyPI's torchvision importable beside torch's CPU build in the vLLM test environment.

PyPI ships torchvision as a CUDA build. Beside ``torch==2.13.0+cpu`` its compiled ops do not
load, which torchvision tolerates, except that ``_meta_registrations.py`` registers fake
kernels for ``torchvision::nms`` / ``qnms`` without checking that the ops exist, so the import
fails ("operator torchvision::nms does not exist"). vLLM's LLaVA module needs torchvision
through transformers' Pixtral image processor. This script guards those two registrations the
way the file already guards the others (``torchvision.extension._has_ops()``), then checks
that vLLM's LLaVA module imports. Idempotent; run by ``make vllm-env``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

UNGUARDED = '@torch.library.register_fake("torchvision::{op}")'
GUARDED = (
    '@(torch.library.register_fake("torchvision::{op}") '
    "if torchvision.extension._has_ops() else (lambda fn: fn))"
)


def patch_meta_registrations() -> bool:
    """Guard the nms/qnms fake registrations; True when the file changed."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise SystemExit("torchvision is not installed in this environment")
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = original = path.read_text()
    for op in ("nms", "qnms"):
        text = text.replace(UNGUARDED.format(op=op), GUARDED.format(op=op))
    if text != original:  # a new file, not an in-place write: uv hardlinks from its cache
        tmp = path.with_suffix(".py.patched")
        tmp.write_text(text)
        os.replace(tmp, path)
    return text != original


def main() -> None:
    changed = patch_meta_registrations()
    import vllm.model_executor.models.llava  # noqa: F401  (fails loudly if still broken)

    print(
        f"torchvision meta registrations {'patched' if changed else 'already guarded'}; "
        "vLLM's LLaVA module imports"
    )


if __name__ == "__main__":
    sys.exit(main())
