"""One eval from spec to files: answer, score, summarise, draw, write.

`evaluate` is what `python -m pipeline eval` and tests call. The overlays are drawn for
the first items (by id) answered under every configuration, from their input images.
Non-goals: the exit code (the CLI's), resume.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.eval import overlay, render
from pipeline.eval.run import CONFIG, answer_all
from pipeline.eval.spec import EvalSpec, config_label, configurations
from pipeline.eval.summary import score_rows, summarize
from pipeline.images import fetch_bytes
from pipeline.preprocess import resolve_path
from pipeline.report.content import Block, num
from pipeline.storage import filesystem, filesystem_path


def evaluate(
    spec: EvalSpec, run_date: str, *, threshold: float | None = None, progress: bool = False
) -> dict[str, Any]:
    """Run the eval and write its files; returns the summary (also eval.json)."""
    table, images = answer_all(spec, run_date, progress=progress)
    table, problems = score_rows(table, spec.eval.references_column)
    labels = [label for label, _ in configurations(spec)]
    summary = summarize(table, labels, metric=spec.eval.metric, gated=config_label(spec.pruning))
    summary |= {
        "name": spec.name,
        "model": spec.model.path,
        "run_date": run_date,
        "threshold": threshold,
        "problems": problems,
    }
    page = render.blocks(spec.name, spec.model.path, summary, problems)
    charts = {render.CHART: render.chart(summary, threshold)}
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
        out += [
            Block("h2", f"{item_id}: {mine[labels[0]]['question']}"),
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
