"""One eval from spec to files: answer, score, summarise, draw, write.

`evaluate` is what `python -m pipeline eval` and tests call. The overlays are drawn for
items answered under every configuration, on different images where the set has them
(`pipeline.eval.run`), from their input images, with each item's reference answers.
Non-goals: the exit code (the CLI's), resume.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.eval import overlay, render
from pipeline.eval.run import CONFIG, answer_all
from pipeline.eval.spec import EvalSpec, config_label, configurations, series_of
from pipeline.eval.summary import reference_texts, score_rows, summarize
from pipeline.io.images import fetch_bytes
from pipeline.io.storage import filesystem, filesystem_path
from pipeline.job.checks import model_config
from pipeline.report.content import Block, num
from pipeline.stages.preprocess import resolve_path


def evaluate(
    spec: EvalSpec, run_date: str, *, threshold: float | None = None, progress: bool = False
) -> dict[str, Any]:
    """Run the eval and write its files; returns the summary (also eval.json)."""
    table, images = answer_all(spec, run_date, progress=progress)
    table, problems = score_rows(table, spec.eval.references_column)
    configs = configurations(spec)
    labels = [label for label, _ in configs]
    summary = summarize(
        table,
        labels,
        metric=spec.eval.metric,
        gated=config_label(spec.pruning),
        series={label: series_of(p) for label, p in configs},
    )
    summary |= {
        "name": spec.name,
        "model": spec.model.path,
        "run_date": run_date,
        "threshold": threshold,
        "problems": problems,
        "tiny_random_model": bool(model_config(spec).get("resprune_tiny_random")),
    }
    drawn = render.chart(summary, threshold)
    charts = {render.CHART: drawn} if drawn else {}
    page = render.blocks(spec.name, spec.model.path, summary, problems)
    page = [b for b in page if b.kind != "chart" or b.text in charts]
    extra = _overlay_blocks(spec, table, labels, images, charts)
    files = render.write_all(
        spec.output.uri,
        spec.storage,
        summary=summary,
        table=table,
        page=page,
        charts=charts,
        html_extra=extra,
    )
    return summary | {"files": files}


def _overlay_blocks(
    spec: EvalSpec,
    table: pa.Table,
    labels: list[str],
    images: dict[str, Any],
    charts: dict[str, str],
) -> list[Block]:
    """Per drawn item: its question, each configuration's answer, and kept-patch overlays."""
    if not images:
        return []
    metric = spec.eval.metric
    out = [Block("h2", "Kept patches per pruner (dimmed: dropped)")]
    rows = table.filter(pc.is_in(table["id"], pa.array(list(images)))).to_pylist()
    for item_id in sorted(images):
        mine = {r[CONFIG]: r for r in rows if r["id"] == item_id}
        refs = mine[labels[0]][spec.eval.references_column]
        out += [
            Block("h2", f"{item_id}: {mine[labels[0]]['question']}"),
            Block("p", f"References: {references_text(refs)}"),
            Block(
                "table",
                header=["config", "answer", metric, "kept tokens"],
                rows=[
                    [
                        lb,
                        str(mine[lb]["answer"]),
                        num(mine[lb][metric]),
                        str(mine[lb]["kept_tokens"]),
                    ]
                    for lb in labels
                ],
            ),
        ]
        try:
            view = overlay.square_view(_bytes(spec, images[item_id]), **_caps(spec))
        except Exception as exc:  # the image was answered, so this is rare; say why, go on
            out.append(Block("note", f"no overlay for {item_id}: {exc}"))
            continue
        for lb in labels:
            svg = overlay.overlay_svg(view, mine[lb]["kept_indices"], mine[lb]["visual_tokens"])
            if svg is not None:
                charts[f"overlay {item_id} {lb}"] = svg
                out += [Block("p", lb), Block("chart", f"overlay {item_id} {lb}")]
    return out


def references_text(value: Any) -> str:
    """An item's reference answers, most frequent first: ``yes (7), no (2), (blank) (1)``."""
    counts = Counter(reference_texts(value))
    if not counts:
        return "(none)"
    return ", ".join(f"{r.strip() or '(blank)'} ({n})" for r, n in counts.most_common())


def _caps(spec: EvalSpec) -> dict[str, int]:
    ex = spec.execution
    return {"max_pixels": ex.max_image_pixels, "max_bytes": ex.max_image_bytes}


def _bytes(spec: EvalSpec, image: Any) -> bytes | None:
    """Encoded bytes of an input image value: bytes, the datasets Image() struct, or a path."""
    if isinstance(image, dict):
        if image.get("bytes"):
            return image["bytes"]
        image = image.get("path")
    elif not spec.input.image_uri_column:
        return image
    uri = resolve_path(image, spec.input.image_root)
    fs = filesystem(uri, spec.storage)[0]
    return fetch_bytes(fs, filesystem_path(uri), max_bytes=spec.execution.max_image_bytes)
