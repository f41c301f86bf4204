"""Checks that an S3-compatible server honours conditional writes, which claw's
exactly-once protocol over s3:// rests on (docs/ARCHITECTURE.md, "Shared
directory on an object store"):

  - PUT with `If-None-Match: *` on an existing key fails with 412 (put-if-absent);
  - PUT with `If-Match: <etag>` fails with 412 when the etag is stale, and
    succeeds with the current one (conditional update of LATEST);
  - the object keeps the first writer's bytes.

A server that silently overwrites would make the s3:// exactly-once tests prove
nothing, so scripts/test runs this before pointing them at the server.

    .venv-s3/bin/python scripts/s3_conditional_check.py http://127.0.0.1:PORT

(boto3 comes with moto; requests are signed, as claw's are: moto answers an
unsigned conditional PUT with 403, not 412.)
Exit status 0 when all hold; 1 with the failed check on stderr.
"""

import sys
import uuid

import boto3
import botocore.exceptions


def status_of(call):
    try:
        return call()["ResponseMetadata"]["HTTPStatusCode"]
    except botocore.exceptions.ClientError as e:
        return e.response["ResponseMetadata"]["HTTPStatusCode"]


def main():
    endpoint = sys.argv[1].rstrip("/")
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="claw-test",
        aws_secret_access_key="claw-test",
    )
    bucket = f"claw-check-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    key = "state/judge/done/x.parquet"

    def put(body, **cond):
        return lambda: s3.put_object(Bucket=bucket, Key=key, Body=body, **cond)

    def get():
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    first = s3.put_object(Bucket=bucket, Key=key, Body=b"first", IfNoneMatch="*")["ETag"]
    status = status_of(put(b"second", IfNoneMatch="*"))
    assert status == 412, f"a second put-if-absent returned {status}, not 412: the server overwrites"
    assert get() == b"first", "the object was overwritten by a refused put-if-absent"

    status = status_of(put(b"stale", IfMatch='"00000000000000000000000000000000"'))
    assert status == 412, f"If-Match with a stale etag returned {status}, not 412"
    status = status_of(put(b"update", IfMatch=first))
    assert status == 200, f"If-Match with the current etag returned {status}"
    status = status_of(put(b"again", IfMatch=first))
    assert status == 412, f"If-Match with a replaced etag returned {status}, not 412"
    assert get() == b"update", "the conditional update did not take"
    s3.delete_object(Bucket=bucket, Key=key)
    s3.delete_bucket(Bucket=bucket)
    print(f"{endpoint}: a second If-None-Match: * PUT gets 412; If-Match honours etags")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"s3_conditional_check: {e}", file=sys.stderr)
        sys.exit(1)
