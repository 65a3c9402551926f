"""The cost report: GPU hours used, billed and saved by pruning, with quality drift.

Public surface: `write_report(output_uri, *, price=None, formats=("md", "html", "json"))`
and `build_report(nights, ...)`; the command line lives in `cli.py`.

May import: `pipeline.spec` and this package (it reads committed output through pyarrow;
it never runs a model).
"""

from pipeline.report.api import build_report, write_report

__all__ = ["build_report", "write_report"]
