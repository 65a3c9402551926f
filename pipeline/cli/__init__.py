"""The command-line front end: one module per `python -m pipeline` command.

`run`, `validate`, `submit`, `demo`, `tiny` and `schemas` (`report`, `eval` and
`render-k8s` live in their own packages). Each exposes `add_arguments(parser)` and
`main(args) -> int`.

May import: anything in `pipeline` and `resprune`; nothing imports it but `__main__`.
"""
