"""The output row contract: every column's Arrow type and meaning, in one place.

`schemas/output.arrow.json` and `schemas/output_columns.md` are generated from this list
(`python -m pipeline schemas`); the model stage builds its output table with exactly this
schema (plus the job's pass-through columns), and error rows carry nulls in model columns.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.faults import ITEM_CAUSES
from pipeline.io.storage import StorageError
from pipeline.spec import ColumnsSpec

ERROR_CAUSES = tuple(ITEM_CAUSES)  # the documented enum: pipeline.faults decides

_I32, _F64, _STR = pa.int32(), pa.float64(), pa.string()

OUTPUT_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("id", _STR, "Input row id (unique; exactly one output row per input row)."),
    ("question", _STR, "Question asked (the job's default prompt when the input had none)."),
    ("answer", _STR, "Generated answer; null on error rows."),
    ("status", _STR, '"ok" or "error".'),
    ("error", _STR, "Error message naming the cause and field; null when ok."),
    ("error_cause", _STR, "Short cause enum: " + ", ".join(ERROR_CAUSES) + "."),
    ("model", _STR, "Model path of the job spec."),
    ("pruner", _STR, "Pruning method (resprune, none, random, uniform, pool, divprune)."),
    (
        "keep",
        _STR,
        "The spec's keep value: int tokens, a fraction, or an energy budget "
        "(energy=0.95,min=16,max=192).",
    ),
    ("visual_tokens", _I32, "Visual tokens the image produced before pruning."),
    (
        "kept_tokens",
        _I32,
        "Image tokens the LLM saw (LLaVA-NeXT: kept newlines included); with an energy budget, "
        "the item's chosen k.",
    ),
    ("kept_newlines", _I32, "LLaVA-NeXT image_newline tokens kept (inside kept_tokens); else 0."),
    ("kept_indices", pa.list_(pa.int32()), "Kept token indices, ascending."),
    ("retained_energy", _F64, "Share of the visual tokens' energy in the kept span."),
    ("prompt_tokens", _I32, "Prompt length the LLM processed (after pruning)."),
    ("prompt_tokens_unpruned", _I32, "Prompt length without pruning."),
    ("new_tokens", _I32, "Generated tokens."),
    (
        "gpu_seconds",
        _F64,
        "Measured device wall time of the item's batch, split over its items (compile and "
        "capture of a new shape excluded: the run summary's compile_seconds).",
    ),
    ("batch_id", _STR, "Model batch the item was answered in (its items share one time)."),
    ("batch_size", _I32, "Items in that model batch."),
    (
        "failed_gpu_seconds",
        _F64,
        "The item's share of device time spent on attempts that failed (a batch that raised and "
        "was split, an error item's batch share); a shadow twin's time is never here.",
    ),
    ("preprocess_s", _F64, "CPU seconds to fetch, decode and run the processor."),
    ("vision_s", _F64, "Vision encoder + projector seconds (per item share)."),
    ("select_s", _F64, "Token selection seconds (per item share)."),
    ("generate_s", _F64, "LLM generate seconds (per item share)."),
    ("relevance_extractor", _STR, "Which content-word extractor ran for the relevance."),
    ("relevance_mean", _F64, "Mean text relevance r_i of the image's tokens; null if unused."),
    ("relevance_max", _F64, "Max text relevance r_i of the image's tokens; null if unused."),
    (
        "shadow",
        pa.bool_(),
        "Item's model batch is in the shadow sample and was answered again unpruned (its twin).",
    ),
    ("shadow_answer", _STR, "Unpruned answer; null unless shadow (or when the twin failed)."),
    (
        "shadow_gpu_seconds",
        _F64,
        "Device seconds of the unpruned answer (its share of the unpruned twin), a failed twin's "
        "too; null unless shadow.",
    ),
    (
        "shadow_error",
        _STR,
        "Why the item's unpruned twin failed (a failed shadow batch, left out of the time "
        "ratio); null unless it did.",
    ),
    ("shadow_new_tokens", _I32, "Generated tokens of the unpruned answer; null unless shadow."),
    ("shadow_prompt_tokens", _I32, "Prompt length of the unpruned answer; null unless shadow."),
    ("run_id", _STR, "Run (attempt) that produced the row; matches _runs/<run_id>.json."),
    ("run_date", _STR, "The job's run date (YYYY-MM-DD)."),
    ("image_width", _I32, "Decoded width after EXIF rotation; null when undecodable."),
    ("image_height", _I32, "Decoded height after EXIF rotation; null when undecodable."),
    ("question_truncated", pa.bool_(), "The question was cut to model.max_question_tokens."),
]


def output_schema(passthrough: pa.Schema | None = None) -> pa.Schema:
    """The output Arrow schema, with pass-through columns (input types) appended."""
    fields = [pa.field(name, typ) for name, typ, _ in OUTPUT_COLUMNS]
    if passthrough is not None:
        fields += [passthrough.field(n) for n in passthrough.names]
    return pa.schema(fields)


def check_passthrough_names(spec: ColumnsSpec) -> None:
    """Refuse pass-through columns whose output names clash with the output's own columns."""
    renamed = {spec.output_name(c) for c in spec.passthrough_columns}
    clash = sorted(renamed & {name for name, _, _ in OUTPUT_COLUMNS})
    if clash:
        raise StorageError(
            f"passthrough column(s) {clash} clash with output columns; rename them with "
            f"input.passthrough_rename, e.g. {{{clash[0]}: input_{clash[0]}}}"
        )
