"""The CPU and GPU stages of the data path and the processor that composes them.

`preprocess` (CPU: fetch, decode, pixel caps, the model's processor), `answer` (GPU actors:
vision encoder, pruner, batched generation, per-item statistics) and `processor`
(`build_processor`: reader rows -> preprocess -> answer, the public stage API).

May import: `pipeline.spec`, `pipeline.faults`, `pipeline.filters`, `pipeline.io`,
`pipeline.output`, `pipeline.monitoring` (its metrics), `resprune`, and this package.
"""
