"""One eval from spec to files: answer, score, summarise, draw, write.

`evaluate` is what `python -m pipeline eval` and tests call. The overlay images are read
again from the input for the few items drawn (ids sorted, scored under every
configuration). Non-goals: the exit code (the CLI's), resume.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.eval import overlay, render
from pipeline.eval.run import CONFIG, answer_all
from pipeline.eval.spec import EvalSpec, config_label, configurations
from pipeline.eval.summary import score_rows, summarize
from pipeline.images import fetch_bytes
from pipeline.report.content import Block
from pipeline.storage import filesystem, filesystem_path, list_files


def evaluate(spec: EvalSpec, run_date: str, *, threshold: float | None = None,
             progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """Run the eval and write its files; returns the summary (also eval.json)."""
    table = answer_all(spec, run_date, progress=progress)
    table, problems = score_rows(table, spec.eval.references_column)
    labels = [label for label, _ in configurations(spec)]
    summary = summarize(table, labels, metric=spec.eval.metric, gated=config_label(spec.pruning))
    summary |= {"name": spec.name, "model": spec.model.path, "run_date": run_date,
                "threshold": threshold, "problems": problems}  # fmt: skip
    page = render.blocks(spec.name, spec.model.path, summary, problems)
    charts = {render.CHART: render.chart(summary, threshold)}
    extra = _overlay_blocks(spec, table, labels, charts)
    files = render.write_all(spec.output.uri, spec.storage, summary=summary, table=table,
                             page=page, charts=charts, html_extra=extra)  # fmt: skip
    return summary | {"files": files}


def _overlay_blocks(spec: EvalSpec, table: pa.Table, labels: list[str],
                    charts: dict[str, str]) -> list[Block]:  # fmt: skip
    """Per drawn item: its question, each configuration's answer, and kept-patch overlays."""
    metric = spec.eval.metric
    scored = table.filter(pc.is_valid(table[metric]))
    counts = pc.value_counts(scored["id"]).to_pylist()
    ids = sorted(c["values"] for c in counts if c["counts"] == len(labels))
    ids = ids[: spec.eval.overlay_items]
    if not ids:
        return []
    images = _images(spec, ids)
    out = [Block("h2", "Kept patches per pruner (dimmed: dropped)")]
    rows = table.filter(pc.is_in(table["id"], pa.array(ids))).to_pylist()
    ex = spec.execution
    for item_id in ids:
        mine = {r[CONFIG]: r for r in rows if r["id"] == item_id}
        first = mine[labels[0]]
        out += [Block("h2", f"{item_id}: {first['question']}"),
                Block("table", header=["config", "answer", metric, "kept tokens"],
                      rows=[[lb, str(mine[lb]["answer"]), f"{mine[lb][metric]:.2f}",
                             str(mine[lb]["kept_tokens"])] for lb in labels])]  # fmt: skip
        try:
            view = overlay.square_view(images[item_id], max_pixels=ex.max_image_pixels,
                                       max_bytes=ex.max_image_bytes)  # fmt: skip
        except Exception as exc:  # the image was answered, so this is rare; say why, go on
            out.append(Block("note", f"no overlay for {item_id}: {exc}"))
            continue
        for lb in labels:
            svg = overlay.overlay_svg(view, mine[lb]["kept_indices"], mine[lb]["visual_tokens"])
            if svg is None:
                continue
            name = f"overlay {item_id} {lb}"
            charts[name] = svg
            out += [Block("p", lb), Block("chart", name)]
    return out


def _images(spec: EvalSpec, ids: list[str]) -> dict[str, bytes]:
    """Encoded bytes of the items ``ids``, read again from the input."""
    inp = spec.input
    fs, path = filesystem(inp.uri, spec.storage)
    column = inp.image_column or inp.image_uri_column
    data = pads.dataset(list_files(fs, path, ".parquet"), filesystem=fs, format="parquet")
    rows = data.to_table(columns=[inp.id_column, column],
                         filter=pc.field(inp.id_column).isin(ids)).to_pylist()  # fmt: skip
    out = {}
    for row in rows:
        value = row[column]
        if isinstance(value, dict):  # the datasets Image() struct {bytes, path}
            value = value.get("bytes")
        if inp.image_uri_column:
            img_fs = filesystem(value, spec.storage)[0]
            value = fetch_bytes(
                img_fs, filesystem_path(value), max_bytes=spec.execution.max_image_bytes
            )
        out[row[inp.id_column]] = value
    return out
