"""The exactly-once output: what a run writes and how readers can trust it.

Holds the output row contract (`columns`), the output prefix's markers and scan (`prefix`),
the atomic commit of each model task's rows (`commit`) and the run summary (`summary`).

May import: `pipeline.spec`, `pipeline.faults`, `pipeline.filters`, `pipeline.io`, and this
package.
"""
