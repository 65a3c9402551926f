"""The job spec: one pydantic tree parsed at the CLI edge (`extra="forbid"` everywhere).

Nothing downstream reads raw YAML. Loading renders ``{run_date}`` in URIs, applies
``--set a.b=value`` overrides and reports every validation error at once with its path.
Credentials never live here: S3 keys come from the environment or the node's identity.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from resprune.floor import check_relevance_floor
from resprune.keep import EnergyKeep, energy_keep_problem
from resprune.words import active_extractor

QWEN_MAX_PIXELS = 1280 * 28 * 28  # = resprune.models.qwen_processor.DEFAULT_MAX_PIXELS
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE)", re.IGNORECASE)


class SpecError(ValueError):
    """A job spec that cannot run; the message lists every problem with its key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageSpec(_Strict):
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (else AWS_ENDPOINT_URL from the environment)."
    )
    region: str | None = Field(
        None, description="S3 region (else AWS_REGION / AWS_DEFAULT_REGION)."
    )


class ColumnsSpec(_Strict):
    """Which input column is which (shared by the job's input and the stage API)."""

    id_column: str = Field(
        "id",
        description="Unique id of each row: strings, or integers (written as their decimal "
        "string).",
    )
    image_column: str | None = Field(
        "image",
        description="Column of encoded image bytes or of the Hugging Face datasets Image() "
        "struct {bytes, path} (detected); for WebDataset, the image member's extension "
        "(default: the first of jpg, jpeg, png, webp, ...).",
    )
    image_uri_column: str | None = Field(
        None, description="Column of image paths (s3:// or local), used instead of image_column."
    )
    question_column: str | None = Field(
        "question",
        description="Question per row (for WebDataset: a field of the sample's .json, or a "
        "member such as txt); null/empty/absent means model.default_question.",
    )
    passthrough_columns: list[str] = Field(
        default_factory=list, description="Input columns copied unchanged to the output."
    )
    image_root: str | None = Field(
        None,
        description="Folder that relative image paths resolve against (default: the input "
        "dataset's folder; the working directory for the stage API).",
    )
    passthrough_rename: dict[str, str] = Field(
        default_factory=dict,
        description="Pass-through columns renamed in the output, input name -> output name "
        "(e.g. {status: download_status} for img2dataset's status, which clashes with ours).",
    )

    def output_name(self, column: str) -> str:
        """A pass-through column's name in the output."""
        return self.passthrough_rename.get(column, column)

    @model_validator(mode="after")
    def _renames_passthrough(self) -> ColumnsSpec:
        stray = sorted(set(self.passthrough_rename) - set(self.passthrough_columns))
        if stray:
            raise ValueError(f"passthrough_rename: {stray} not in passthrough_columns")
        names = [self.output_name(c) for c in self.passthrough_columns]
        if len(set(names)) < len(names):
            raise ValueError(f"passthrough_rename: two columns would be named alike: {names}")
        return self

    @model_validator(mode="after")
    def _one_image_source(self) -> ColumnsSpec:
        if self.image_uri_column and self.image_column == "image":
            self.__dict__["image_column"] = None  # the default yields to an explicit URI column
        if bool(self.image_column) == bool(self.image_uri_column):
            raise ValueError("set exactly one of image_column and image_uri_column")
        return self


class InputSpec(ColumnsSpec):
    uri: str = Field(
        description="Folder/prefix of Parquet files, a datasets save_to_disk folder, WebDataset "
        ".tar shards, or a glob; may hold {run_date}."
    )
    format: Literal["auto", "parquet", "datasets", "webdataset"] = Field(
        "auto",
        description="Input format; auto detects .tar shards (webdataset) and save_to_disk "
        "folders (state.json + .arrow files), else Parquet.",
    )
    filter: str | None = Field(
        None,
        description='Rows to keep, as an expression over input columns, e.g. "status == '
        "'success'\" (img2dataset's failed downloads); applied before counting and "
        "recorded in the run summary. Grammar: pipeline/filters.py (parsed, never evaluated; "
        "Parquet and datasets inputs).",
    )

    split: str | None = Field(
        None,
        description="The split to read when input.uri is a datasets DatasetDict folder with "
        "several splits (refused without it).",
    )

    @field_validator("filter")
    @classmethod
    def _filter_parses(cls, v: str | None) -> str | None:
        from pipeline.filters import parse_filter

        if v is not None:
            parse_filter(v)  # FilterError is a ValueError: reported with its key path
        return v


class VllmSpec(_Strict):
    """vLLM engine knobs (``model.engine: vllm``); they change throughput, not answers."""

    max_num_seqs: int = Field(
        64, ge=1, description="Sequences vLLM's scheduler runs at once (continuous batching)."
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="Share of the GPU memory vLLM may use (weights + KV cache)."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Context length vLLM reserves per sequence (None: the model's)."
    )
    kv_cache_memory_bytes: int | None = Field(
        None,
        ge=1,
        description="KV cache size in bytes, instead of sizing it from gpu_memory_utilization "
        "(None: from the utilisation on GPUs, 512 MiB on CPU).",
    )
    enforce_eager: bool | None = Field(
        None,
        description="Skip CUDA graphs and compilation: faster start, slower decode "
        "(None: off on GPUs, on for CPU).",
    )


class TransformersSpec(_Strict):
    """transformers engine knobs (``model.engine: transformers``); same answers, other speed."""

    cache: Literal["auto", "static", "dynamic"] = Field(
        "auto",
        description="KV cache: static (preallocated, bucketed) or dynamic; auto: static on GPU, "
        "dynamic on CPU.",
    )
    compile: bool | None = Field(
        None, description="Compile the static-cache decode step (CUDA graphs); None: on GPU."
    )


class ModelSpec(_Strict):
    path: str = Field(description="Local folder, s3:// prefix, or hub id of the checkpoint.")
    family: Literal[
        "auto",
        "llava",
        "llava_next",
        "qwen2_5_vl",
        "qwen3_vl",
        "qwen3_vl_moe",
        "gemma3",
        "internvl",
    ] = Field("auto", description="Model family; auto reads config.json's model_type.")
    revision: str | None = Field(
        None, description="Hub revision (pin a 40-hex commit in production)."
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Weights dtype on GPU (CPU actors always use float32)."
    )
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Generation budget per item.")
    default_question: str = Field(
        "Describe this image in one sentence.",
        min_length=1,
        description="Prompt when none is given.",
    )
    max_question_tokens: int = Field(
        256, ge=1, description="Longer questions are truncated (and flagged) before templating."
    )
    trust_remote_code: bool = Field(
        False, description="Run code shipped with the checkpoint (off)."
    )
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="What generates from the kept tokens: transformers (reference) or vllm "
        "(needs the vllm extra; LLaVA family with contiguous positions, Qwen2.5-VL with "
        "original or contiguous ones).",
    )
    transformers: TransformersSpec = Field(
        default_factory=TransformersSpec, description="transformers engine settings."
    )
    vllm: VllmSpec = Field(default_factory=VllmSpec, description="vLLM engine settings.")
    max_pixels: int | None = Field(
        QWEN_MAX_PIXELS,
        ge=28 * 28,
        description="Qwen2.5-VL / Qwen3-VL: images are resized (never refused) to at most this "
        "many pixels, so at most max_pixels / 784 merged tokens each for Qwen2.5-VL, / 1024 for "
        "Qwen3-VL (default 1280 * 28 * 28: 1280, 980 tokens); the checkpoint's own cap wins "
        "when smaller; null keeps the checkpoint's. Other families ignore it.",
    )
    min_pixels: int | None = Field(
        None,
        ge=1,
        description="Qwen2.5-VL / Qwen3-VL: smaller images are resized up to at least this many "
        "pixels (null: the checkpoint's, 56 * 56 for Qwen2.5-VL). Other families ignore it.",
    )
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa",
        description="Attention kernels of the transformers model; flash_attention_2 needs "
        "flash_attn (in the GPU image) and runs Qwen2.5-VL's windowed vision attention as one "
        "varlen call per layer.",
    )

    @model_validator(mode="after")
    def _pixel_bounds(self) -> ModelSpec:
        low, high = self.min_pixels, self.max_pixels
        if low is not None and high is not None and low > high:
            raise ValueError(f"model.min_pixels ({low}) must be <= model.max_pixels ({high})")
        return self


class EnergyKeepSpec(_Strict):
    """``keep`` as an energy budget (resprune only): per image the fewest picks that retain a
    share ``energy`` of its token energy, clamped to [min, max] tokens."""

    energy: float = Field(
        gt=0,
        le=1,
        description="Share of each image's token energy the kept tokens retain (tau); 1 keeps max.",
    )
    min: int = Field(16, ge=1, description="Fewest tokens an image keeps.")
    max: int = Field(
        192,
        ge=1,
        description="Most tokens an image keeps (LLaVA-NeXT: the item's cap, newlines included).",
    )

    @model_validator(mode="after")
    def _range(self) -> EnergyKeepSpec:
        problem = energy_keep_problem(self.energy, self.min, self.max)
        if problem:
            raise ValueError(problem)
        return self

    def value(self) -> EnergyKeep:
        """The library's budget (`resprune.keep.EnergyKeep`)."""
        return EnergyKeep(self.energy, self.min, self.max)


class PruningSpec(_Strict):
    method: Literal["resprune", "none", "random", "uniform", "pool", "divprune"] = Field(
        "resprune", description="Token selector; the others are baselines."
    )
    keep: Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0, le=1)] | EnergyKeepSpec = (
        Field(
            64,
            description="Visual tokens kept per image (int), a fraction of them (float in "
            "(0, 1]), or an energy budget {energy, min, max} (resprune: per image the fewest "
            "picks that retain that share of its token energy, within [min, max]).",
        )
    )
    alpha: float = Field(
        1.0,
        description="Relevance exponent in g(r) = max(r, relevance_floor)^alpha; 0 ignores the "
        "text; negative favours tokens least related to the question.",
    )
    relevance_floor: float = Field(
        1e-6,
        gt=0,
        le=1,
        description="Relevance below it counts as the floor. At 1e-6 with alpha > 0 a token whose "
        "cosine to the question is <= 0 is picked only after all positively related ones run "
        "out of residual energy (a sign gate); a larger floor (e.g. 0.05) lets it compete at a "
        "fixed discount. With alpha < 0 it caps the top weight at floor^alpha.",
    )
    position_policy: Literal["original", "contiguous"] = Field(
        "original", description="Kept tokens keep their original positions, or are renumbered."
    )
    anyres: Literal["per_crop", "global"] = Field(
        "per_crop",
        description="LLaVA-NeXT, InternVL: budget split across crops (tiles and the thumbnail),"
        " or one selection over the image.",
    )
    seed: int = Field(0, description="Seed of the random baseline.")

    @field_validator("keep", mode="before")
    @classmethod
    def _keep_type(cls, v: Any) -> Any:
        """Every bad keep in one line (a plain union would list one error per form)."""
        if isinstance(v, dict):
            return _energy_keep(v)
        if isinstance(v, bool):
            raise ValueError("keep must be an int or a float, not a bool")
        if isinstance(v, int | float) and not _keep_in_range(v):
            raise ValueError(
                "keep must be an int >= 1 (visual tokens) or a float in (0, 1] (a fraction of "
                f"them), got {v}"
            )
        if not isinstance(v, int | float | EnergyKeepSpec):
            raise ValueError(
                f"keep must be an int, a fraction in (0, 1] or {{energy, min, max}}, got {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _weights_finite(self) -> PruningSpec:
        check_relevance_floor(self.alpha, self.relevance_floor)
        return self

    @model_validator(mode="after")
    def _energy_needs_resprune(self) -> PruningSpec:
        if isinstance(self.keep, EnergyKeepSpec) and self.method != "resprune":
            raise ValueError(
                f"keep {{energy: ...}} needs method resprune (its picks carry the energy each "
                f"prefix retains), got method {self.method}"
            )
        return self

    @property
    def keep_value(self) -> int | float | EnergyKeep:
        """keep as the library takes it (`resprune.answer.answer_batch`)."""
        return self.keep.value() if isinstance(self.keep, EnergyKeepSpec) else self.keep

    @property
    def uses_text(self) -> bool:
        """Whether the question's words change the selection."""
        return self.method == "resprune" and self.alpha != 0


def _keep_in_range(v: float) -> bool:
    """One of keep's two numeric forms accepts ``v`` (so a bad value gets one message, not
    one per union member)."""
    if isinstance(v, float) and not v.is_integer():
        return 0 < v <= 1
    return v >= 1 or (isinstance(v, float) and 0 < v <= 1)


class ExecutionSpec(_Strict):
    batch_size: int = Field(16, ge=1, description="Items per model batch (upper bound).")
    max_batch_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None,
        description="Pack model batches up to this many LLM tokens (prompt after pruning + new); "
        "auto: by each batch's device bytes (vision tower, selector, padded and bucketed KV "
        "cache, prefill) within the actor's share of the GPU (16384 tokens on CPU; see "
        "resprune/memory.py). An out-of-memory shrinks the actor's budget and splits the "
        "batch. Raise batch_size with auto: it still caps items.",
    )
    actors: int | tuple[int, int] = Field(
        1, description="Model actors: a fixed count or [min, max]."
    )
    gpus_per_actor: float = Field(1, ge=0, description="GPUs per model actor; 0 runs on CPU.")
    cpus_per_actor: float = Field(1, ge=0, description="CPUs reserved per model actor.")
    preprocess_batch_size: int = Field(8, ge=1, description="Rows per CPU preprocess batch.")
    preprocess_concurrency: int | tuple[int, int] | None = Field(
        None, description="CPU preprocess tasks (None: autoscale)."
    )
    max_image_bytes: int = Field(
        50_000_000, ge=1, description="Encoded images above this are errors."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Decoded pixels above this are refused (bomb guard)."
    )
    max_aspect_ratio: float = Field(50.0, gt=1, description="Thinner images are refused.")
    max_task_retries: int = Field(
        2,
        ge=0,
        description="Restarts of the model actor after systemic faults (a CUDA error, a dead "
        "or refusing engine, out of memory with one item) per run; then the run fails with one "
        "line. In a run, a lost node or a killed process is retried without this bound and a "
        "poison item is quarantined (status crashed_worker) after three attempts; the stage "
        "API (no run ledger) bounds Ray's retries of a batch whose actor died by it instead.",
    )
    max_error_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="The run fails (exit 1) when more than this fraction of its items are "
        "error rows, judged once at least error_fraction_min_items items are done.",
    )
    error_fraction_min_items: int = Field(
        50, ge=1, description="Items a run must have answered before its error fraction is judged."
    )
    startup_timeout_s: float = Field(
        1800,
        gt=0,
        description="The run fails (exit 1, one line) when no model actor has started after this "
        "many seconds; meanwhile it says once a minute what the actors wait for. Long enough by "
        "default for an autoscaler to add a GPU node. The same wait applies after a node is "
        "lost mid-run, for capacity to come back.",
    )
    stall_timeout_s: float = Field(
        1800,
        gt=0,
        description="The run fails (exit 1, one line naming what is blocked) when no model "
        "batch has begun or ended for this many seconds after start-up; after a few minutes "
        "of it (a third of this at most) it says once a minute what is blocked.",
    )

    @field_validator("actors")
    @classmethod
    def _actors(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo:
            raise ValueError(f"actors must be >= 1 or [min, max] with 1 <= min <= max, got {v}")
        return v


class OutputSpec(_Strict):
    uri: str = Field(description="Output folder/prefix (local or s3://); may hold {run_date}.")
    rows_per_file: int = Field(10_000, ge=1, description="Upper bound of rows per result file.")
    min_rows_per_file: int = Field(
        64,
        ge=1,
        description="Rows gathered before a commit (more: fewer files, more redo on a crash).",
    )


class CostSpec(_Strict):
    gpu_type: str = Field("H100", description="GPU model the run is billed for.")
    usd_per_gpu_hour: float | None = Field(
        None, ge=0, description="Price per GPU hour; unset means unknown (never guessed)."
    )
    shadow_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Share of model batches also answered unpruned (whole batches): per model "
        "actor and batch-size bucket the first batch, then every ceil(1/fraction)-th.",
    )
    shadow_seed: int = Field(
        0, description="Unused since the shadow sample is systematic; kept so older specs validate."
    )


class RuntimeEnvSpec(_Strict):
    """The subset of Ray's runtime_env we pass through; unknown keys are errors here."""

    working_dir: str | None = Field(None, description="Local dir or remote .zip URI (default: .).")
    py_modules: list[str] | None = Field(None, description="Extra Python modules to upload.")
    pip: list[str] | str | dict[str, Any] | None = Field(None, description="pip packages to add.")
    uv: list[str] | str | dict[str, Any] | None = Field(None, description="uv packages to add.")
    conda: str | dict[str, Any] | None = Field(None, description="Conda env name or spec.")
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Non-secret environment variables (stored in plaintext)."
    )
    excludes: list[str] = Field(
        default_factory=list, description="Extra upload excludes (.venv and outputs always are)."
    )
    config: dict[str, Any] | None = Field(None, description="Ray runtime_env config options.")

    @field_validator("env_vars")
    @classmethod
    def _no_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted(k for k in v if SECRET_NAME.search(k))
        if bad:
            raise ValueError(
                f"{bad} look like credentials; Ray stores env_vars in plaintext. "
                "Give them to the cluster from a Kubernetes Secret or node identity instead."
            )
        return v


class MonitoringSpec(_Strict):
    """Where the end of a run is reported (`pipeline.monitoring`); URLs are never printed whole."""

    pushgateway: str | None = Field(
        None,
        description="Prometheus Pushgateway URL: every run's end-of-run record (resprune_run_*) "
        "is pushed there, grouped by job name; one that is down costs a warning line.",
    )
    notify: str | None = Field(
        None,
        description="URL receiving a JSON POST (Slack-compatible `text` plus structured fields) "
        "when a run fails, is refused mid-way or fails its gate.",
    )
    progress_interval_s: float = Field(
        60.0,
        gt=0,
        description="Seconds between progress lines (done/total, items/s, ETA, errors) when "
        "stderr is not a terminal.",
    )

    @field_validator("pushgateway", "notify")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v


class GateSpec(_Strict):
    """The nightly gate, judged over the whole output prefix at the end of a run; a failed
    check fails the run (exit 1) and notifies. Unset checks are not judged."""

    all_ids_committed: bool = Field(
        True, description="Every input id (after input.filter) has a committed row."
    )
    min_items_per_gpu_hour: float | None = Field(
        None, gt=0, description="Floor on committed items per billed GPU hour (actors' time)."
    )
    min_shadow_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Floor on the shadow sample's agreement of pruned with unpruned answers "
        "(mean token F1, or exact match; see agreement).",
    )
    agreement: Literal["token_f1", "exact_match"] = Field(
        "token_f1", description="Which agreement min_shadow_agreement bounds."
    )
    kept_tokens_within_budget: bool = Field(
        True,
        description="The kept visual tokens per item stay within pruning.keep (int: <= keep; "
        "fraction: kept/visual <= keep; energy budget: <= max), on average.",
    )


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="Run and submission name.")
    input: InputSpec
    model: ModelSpec
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    output: OutputSpec
    cost: CostSpec = Field(default_factory=CostSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    runtime_env: RuntimeEnvSpec = Field(default_factory=RuntimeEnvSpec)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)
    gate: GateSpec | None = Field(None, description="The nightly gate (none: not judged).")

    @model_validator(mode="after")
    def _engine_positions(self) -> JobSpec:
        _check_engine_positions(self.model, self.pruning)
        return self


def _energy_keep(value: dict[str, Any]) -> EnergyKeepSpec:
    unknown = sorted(set(value) - set(EnergyKeepSpec.model_fields))
    if unknown:
        raise ValueError(
            f"keep: unknown key(s) {unknown}; an energy budget is {{energy, min, max}}"
        )
    if "energy" not in value:
        raise ValueError("keep.energy is required in an energy budget {energy, min, max}")
    defaults = {name: f.default for name, f in EnergyKeepSpec.model_fields.items()}
    merged = defaults | value
    problem = energy_keep_problem(merged["energy"], merged["min"], merged["max"])
    if problem:
        raise ValueError(problem)
    return EnergyKeepSpec.model_validate(value)


def _check_engine_positions(model: ModelSpec, pruning: PruningSpec) -> None:
    """engine vllm: the family, and the position policies under which it answers as
    transformers does for it (family auto: the policies some family takes; `validate --deep`
    and the model actor check again once config.json names the family)."""
    from resprune.engines.vllm_plugin import policies_for_any_family, vllm_refusal

    if model.engine != "vllm":
        return
    policy = pruning.position_policy
    if model.family == "auto":
        allowed = policies_for_any_family()
        if policy not in allowed:
            raise ValueError(
                f"pruning.position_policy: engine vllm takes {' or '.join(allowed)}, not {policy}"
            )
        return
    refusal = vllm_refusal(model.family, policy)
    if refusal:
        raise ValueError(refusal)


class ProcessorConfig(_Strict):
    """The stage API's config (`pipeline.build_processor`): a job spec without its storage
    locations; the job spec's sections of the same names mean the same."""

    input: ColumnsSpec = Field(default_factory=ColumnsSpec)
    model: ModelSpec
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    cost: CostSpec = Field(default_factory=CostSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)

    @model_validator(mode="after")
    def _engine_positions(self) -> ProcessorConfig:
        _check_engine_positions(self.model, self.pruning)
        return self

    @classmethod
    def from_job(cls, spec: JobSpec, *, dataset_folder: str | None = None) -> ProcessorConfig:
        """The processor part of a job spec; relative image paths default to resolving
        against ``dataset_folder`` (the folder of the job's input)."""
        parts = spec.model_dump(include=set(cls.model_fields))
        parts["input"] = {k: v for k, v in parts["input"].items() if k in ColumnsSpec.model_fields}
        parts["input"]["image_root"] = spec.input.image_root or dataset_folder
        # only what the spec set: defaults stay defaults (the layout is sized to the cluster)
        parts["execution"] = spec.execution.model_dump(exclude_unset=True)
        return cls.model_validate(parts)


AnyJob = TypeVar("AnyJob", bound=JobSpec)


def fingerprint(spec: JobSpec) -> str:
    """Hash of the settings that change answers (input columns, model, pruning).

    A local model path counts by where it points, not how it is spelled (relative, absolute,
    ``~``, trailing slash), so one job run from two working directories resumes. When the
    selection reads the question, the word extractor this installation runs (spaCy or
    stopwords) is part of it too.
    """
    parts = _fingerprinted(spec)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_fields(spec: JobSpec) -> dict[str, Any]:
    """The fingerprinted settings as flat ``section.key -> value`` (stored in markers, so a
    refusal can name the fields that differ)."""
    flat: dict[str, Any] = {}
    for name, value in _fingerprinted(spec).items():
        if isinstance(value, dict):
            flat |= {f"{name}.{k}": v for k, v in value.items()}
        else:
            flat[name] = value
    return flat


def _fingerprinted(spec: JobSpec) -> dict[str, Any]:
    parts = spec.model_dump(include={"model", "pruning", "input"}, mode="json")
    for where in ("uri", "format", "split", "image_root"):  # where it lives, not what it means
        parts["input"].pop(where, None)
    for unset in ("filter", "passthrough_rename"):  # absent keeps older outputs' fingerprints
        if not parts["input"].get(unset):
            parts["input"].pop(unset, None)
    for knobs in ("transformers", "vllm"):  # engine throughput settings
        parts["model"].pop(knobs, None)
    parts["model"]["path"] = canonical_model_path(spec.model.path)
    if spec.pruning.uses_text:
        parts["relevance_extractor"] = active_extractor()
    return parts


def anchor_local_paths(spec: AnyJob) -> AnyJob:
    """A copy of ``spec`` whose local paths (input, output, image root, model folder) are
    absolute, resolved against this process's working directory: Ray workers, on a cluster
    this driver joined, run in folders of their own."""
    fixed = spec.model_copy(deep=True)
    fixed.input.uri = _absolute(spec.input.uri)
    fixed.output.uri = _absolute(spec.output.uri)
    if spec.input.image_root:
        fixed.input.image_root = _absolute(spec.input.image_root)
    fixed.model.path = canonical_model_path(spec.model.path)
    return fixed


def _absolute(uri: str) -> str:
    """A local path made absolute; a URI (``s3://``, ``file://``) as written."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def canonical_model_path(path: str) -> str:
    """A local model folder as an absolute, resolved path; URIs and hub ids as written."""
    if "://" in path:
        return path.rstrip("/")
    local = os.path.expanduser(path)
    if path.startswith((".", "/", "~")) or os.path.isdir(local):
        return os.path.realpath(local)
    return path


def load_spec(
    path: str | Path,
    *,
    run_date: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    kind: type[JobSpec] | None = None,
) -> tuple[JobSpec, str]:
    """Parse a job YAML, apply ``key.path=value`` overrides and render ``{run_date}``.

    Returns the spec (a ``kind``, default JobSpec) and the run date used (default: today, UTC).
    """
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: cannot read job spec: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a job spec is a mapping, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    date = _run_date(run_date)
    spec = parse_spec(raw, source=str(path), kind=kind)
    spec.input.uri = spec.input.uri.replace("{run_date}", date)
    spec.output.uri = spec.output.uri.replace("{run_date}", date)
    return spec, date


def parse_spec(
    raw: dict[str, Any], *, source: str = "spec", kind: type[JobSpec] | None = None
) -> JobSpec:
    """Validate a raw mapping as a ``kind`` (default JobSpec); all errors in one SpecError."""
    try:
        return (kind or JobSpec).model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: {exc.error_count()} problem(s) in the job spec:"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  - {where}: {err['msg']}")
        raise SpecError("\n".join(lines)) from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SpecError(f"--set expects key.path=value, got {item!r}")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"--set {key}: {part!r} is not a mapping")
    node[leaf] = yaml.safe_load(value)


def _run_date(value: str | None) -> str:
    if value is None:
        return dt.datetime.now(dt.UTC).date().isoformat()
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise SpecError(f"--run-date must be YYYY-MM-DD, got {value!r}") from None
