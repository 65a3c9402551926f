"""The eval file: a job spec (model, input, execution, output, and the configured pruner)
plus an ``eval`` section naming the reference column and the configurations to compare.

``pruning`` is the configuration a nightly would run: the gate (``--fail-below``) reads its
relative performance. ``none`` (the reference) and ``pruning`` are always evaluated, in
addition to ``eval.compare``. Non-goals: running anything.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import Field

from pipeline.io.storage import StorageError
from pipeline.spec import EnergyKeepSpec, JobSpec, PruningSpec, _Strict

DEFAULT_COMPARE = [{"method": "resprune", "keep": k} for k in (192, 128, 64)] + [
    {"method": m, "keep": 64} for m in ("random", "uniform", "pool", "divprune")
]
REFERENCE = "none"


class EvalSection(_Strict):
    references_column: str = Field(
        "answers",
        description="Input column with the reference answers: a list of strings, or of VQA "
        "answer structs {answer, ...} (VQAv2's answers).",
    )
    compare: list[PruningSpec] = Field(
        default_factory=lambda: [PruningSpec.model_validate(c) for c in DEFAULT_COMPARE],
        description="Pruning configurations to compare (fixed keep or an energy budget "
        "{energy, min, max}); 'none' and the spec's pruning are always added.",
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
    """A short unique-enough name: ``none``, ``resprune@64``, ``resprune@64 a=0.5 f=0.05``,
    ``resprune@energy0.95[16-192]`` (an energy budget)."""
    if p.method == REFERENCE:
        return REFERENCE
    keep = p.keep
    budget = f"energy{keep.energy:g}[{keep.min}-{keep.max}]" if is_adaptive(p) else f"{keep}"
    label = f"{p.method}@{budget}"
    default = PruningSpec()
    if p.method == "resprune" and p.alpha != default.alpha:
        label += f" a={p.alpha:g}"
    if p.method == "resprune" and p.relevance_floor != default.relevance_floor:
        label += f" f={p.relevance_floor:g}"
    if p.method == "random" and p.seed != default.seed:
        label += f" seed={p.seed}"
    return label


def is_adaptive(p: PruningSpec) -> bool:
    """Whether the configuration picks each image's k by retained energy."""
    return isinstance(p.keep, EnergyKeepSpec)


def series_of(p: PruningSpec) -> str:
    """The curve a configuration belongs to in the comparison at equal kept tokens: its method
    for fixed budgets; each energy budget is a point of its own."""
    return config_label(p) if is_adaptive(p) else p.method


def configurations(spec: EvalSpec) -> list[tuple[str, PruningSpec]]:
    """(label, pruning) to evaluate: none first, the configured pruner, then ``compare``."""
    out: dict[str, PruningSpec] = {REFERENCE: PruningSpec(method=REFERENCE)}
    for p in [spec.pruning, *spec.eval.compare]:
        out.setdefault(config_label(p), p)
    return list(out.items())


def check_references(where: str, schema: pa.Schema, column: str) -> None:
    """The references column holds a list of strings or of ``{answer: ...}`` structs (or
    ``datasets``' ``Sequence({answer: ...})``, a struct of lists); else StorageError, naming
    the column and its type. A plain string would score each character as a reference."""
    if column not in schema.names:
        raise StorageError(f"{where}: no eval.references_column {column!r}; it has {schema.names}")
    typ = schema.field(column).type
    if not _references_type(typ):
        raise StorageError(
            f"{where}: eval.references_column {column!r} has type {typ}: expected a list of "
            "strings or of {answer: ...} structs (VQAv2's answers)"
        )


def _references_type(t: pa.DataType) -> bool:
    text = (pa.string(), pa.large_string(), pa.null())
    if pa.types.is_null(t):
        return True
    if pa.types.is_struct(t):  # datasets' Sequence({answer: ...}): answer holds the list
        answer = t.field("answer").type if t.get_field_index("answer") >= 0 else None
        return answer is not None and _is_list(answer) and answer.value_type in text
    if not _is_list(t):
        return False
    item = t.value_type
    if pa.types.is_struct(item):
        return item.get_field_index("answer") >= 0 and item.field("answer").type in text
    return item in text


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


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
