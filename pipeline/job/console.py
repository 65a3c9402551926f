"""Console hygiene for `pipeline run` and the demo: progress bars on a terminal only, Ray's
INFO chatter and advisories we acted on kept off the console (Ray's log files keep them).

Non-goals: hiding warnings or errors about the job itself. Ray core's C++ log lines pass
Python's logging; the one false alarm among them (``core_worker.cc ... constructor arguments
in the object store``, Ray Data's own ObjectRef constructor arguments, ray-project/ray#53727)
is dropped by `pipeline.monitoring.stderr_filter` while a run executes.
"""

from __future__ import annotations

import logging
import os
import sys

ADVISORIES = (
    "Progress bars disabled",  # we turned them off on purpose (not a terminal)
    "Token authentication is enabled",  # Ray's default for the local cluster we start
)


class _DropAdvisories(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(ADVISORIES)


def show_progress(progress: bool | None) -> bool:
    """Progress bars: as asked, else only when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else progress


def quiet(*, progress: bool) -> None:
    """Ray's console handlers at WARNING without the advisories; without progress bars, also
    the model loaders' bars off (workers started later inherit the environment)."""
    import ray.data  # noqa: F401  (configures the ray.data loggers)

    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                handler.setLevel(max(handler.level, logging.WARNING))
                if not any(isinstance(f, _DropAdvisories) for f in handler.filters):
                    handler.addFilter(_DropAdvisories())
    if not progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        disable_progress_bars()
        hf_logging.disable_progress_bar()
