"""The eval file: a job spec (model, input, execution, output, and the configured pruner)
plus an ``eval`` section naming the reference column and the configurations to compare.

``pruning`` is the configuration a nightly would run: the gate (``--fail-below``) reads its
relative performance. ``none`` (the reference) and ``pruning`` are always evaluated, in
addition to ``eval.compare``. Non-goals: running anything.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.spec import JobSpec, PruningSpec, _Strict

DEFAULT_COMPARE = [{"method": "resprune", "keep": k} for k in (192, 128, 64)] + [
    {"method": m, "keep": 64} for m in ("random", "uniform", "pool", "divprune")
]
REFERENCE = "none"


class EvalSection(_Strict):
    references_column: str = Field(
        "answers", description="Input column with the list of reference answers (list<string>)."
    )
    compare: list[PruningSpec] = Field(
        default_factory=lambda: [PruningSpec.model_validate(c) for c in DEFAULT_COMPARE],
        description="Pruning configurations to compare; 'none' and the spec's pruning are "
        "always added.",
    )
    metric: Literal["vqa_accuracy", "exact_match", "token_f1"] = Field(
        "vqa_accuracy", description="Metric of relative performance and of the gate."
    )
    overlay_items: int = Field(
        4, ge=0, le=50, description="Items drawn in eval.html with each pruner's kept patches."
    )


class EvalSpec(JobSpec):
    eval: EvalSection = Field(default_factory=EvalSection)


def config_label(p: PruningSpec) -> str:
    """A short unique-enough name: ``none``, ``resprune@64``, ``resprune@64 a=0.5 f=0.05``."""
    if p.method == REFERENCE:
        return REFERENCE
    label = f"{p.method}@{p.keep}"
    default = PruningSpec()
    if p.method == "resprune" and p.alpha != default.alpha:
        label += f" a={p.alpha:g}"
    if p.method == "resprune" and p.relevance_floor != default.relevance_floor:
        label += f" f={p.relevance_floor:g}"
    if p.method == "random" and p.seed != default.seed:
        label += f" seed={p.seed}"
    return label


def configurations(spec: EvalSpec) -> list[tuple[str, PruningSpec]]:
    """(label, pruning) to evaluate: none first, the configured pruner, then ``compare``."""
    out: dict[str, PruningSpec] = {REFERENCE: PruningSpec(method=REFERENCE)}
    for p in [spec.pruning, *spec.eval.compare]:
        out.setdefault(config_label(p), p)
    return list(out.items())


def job_of(spec: EvalSpec) -> JobSpec:
    """The job spec each configuration runs with: references passed through, no shadow."""
    refs = spec.eval.references_column
    passthrough = [*spec.input.passthrough_columns]
    if refs not in passthrough:
        passthrough.append(refs)
    data = spec.model_dump(exclude={"eval"})
    data["input"]["passthrough_columns"] = passthrough
    data["cost"]["shadow_fraction"] = 0.0  # every configuration is answered anyway
    return JobSpec.model_validate(data)
