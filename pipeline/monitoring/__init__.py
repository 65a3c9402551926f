"""What the on-call sees: live metrics (`metrics`), progress lines (`progress`), the nightly
gate (`gate`), the end-of-run record for a Pushgateway (`record`) and the failure notification
(`notify`), run by `night.Night` from the driver. See docs/monitoring.md.

May import: `pipeline.spec`, `pipeline.io`, `pipeline.output`, `pipeline.report`; imported by
`pipeline.job.runner` and (metrics only) `pipeline.stages.answer`.
"""
