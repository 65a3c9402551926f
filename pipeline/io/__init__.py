"""Input formats and storage: where the job's rows come from.

Holds the storage layer (`storage`: fsspec/pyarrow filesystems, S3, redaction), the input
listing and column checks (`inputs`), the format readers (`readers`, `webdataset`,
`hf_arrow`) and image fetching/decoding (`images`).

May import: `pipeline.spec`, `pipeline.faults`, `pipeline.filters`, and this package.
"""
