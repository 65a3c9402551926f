"""`python -m pipeline eval`: answer a labelled set under several pruners, score, and gate.

Modules: `spec` (the eval file: a job spec plus an ``eval`` section), `scoring` (VQA answer
normalisation, VQA accuracy, exact match, token F1), `run` (the job's own read and
preprocess stages, then one model actor that answers each item under every configuration),
`summary` (per-configuration metrics, relative performance, comparison at equal kept tokens,
the gate), `overlay` (kept patches drawn over the image), `render` (eval.md / eval.json /
eval.html / chart), `cli`.

May import: anything in `pipeline` (it is a command of its own: `cli.run` for the shared
arguments, `job`, `stages`, `report`) and `resprune`.
"""
