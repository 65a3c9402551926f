import pyarrow as pa
import pyarrow.parquet as pq


def test_s3_server_round_trip_and_checks_signatures(s3_server, s3_bucket):
    import boto3
    import botocore

    pq.write_table(pa.table({"x": [1, 2]}), f"s3://{s3_bucket}/a.parquet")
    assert pq.read_table(f"s3://{s3_bucket}/a.parquet")["x"].to_pylist() == [1, 2]
    bad = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key="wrong",
        region_name="us-east-1",
    )
    try:
        bad.list_objects_v2(Bucket=s3_bucket)
        raise AssertionError("a wrong secret was accepted")
    except botocore.exceptions.ClientError as exc:
        assert "Signature" in str(exc) or "Access" in str(exc)
