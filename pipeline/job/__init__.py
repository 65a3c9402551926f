"""The job driver: plan a run, execute it on Ray, commit and summarise it.

`checks` (read-only checks of the model path and engine), `plan` (facts, then decisions,
then writes: lease, recovery, dedupe), `runner` (reader -> `build_processor` -> commit sink)
and `console` (progress and quiet logging while a run executes).

May import: every layer below it (`pipeline.spec`, `faults`, `filters`, `io`, `report`,
`output`, `monitoring`, `stages`) and this package; never `pipeline.cli`.
"""
