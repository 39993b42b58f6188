"""The S3 endpoint's own PUT/GET throughput: the limit blockvault's S3 figures are read against.

    python -m bench.s3_endpoint                       # starts a throwaway Ceph (tools/ceph-s3.sh), measures, stops it
    python -m bench.s3_endpoint --sizes 4M,32M --threads 1,4 --total 256M --json out.json
    BLOCKVAULT_S3_ENDPOINT=... python -m bench.s3_endpoint   # an endpoint that runs already (and its keys)

Plain boto3 with the client settings blockvault uses (path addressing, checksums only where
required), objects of the pack sizes, one fresh bucket, every object deleted after its
round.  Client, radosgw and OSD share this machine's cores, so the figures are only
comparable within one run: measure the limit in the same run as the thing it limits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def client(endpoint: str, access: str, secret: str, region: str):
    import boto3
    from botocore.config import Config
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=access, aws_secret_access_key=secret,
        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                      response_checksum_validation="when_required", connect_timeout=10, read_timeout=120,
                      retries={"total_max_attempts": 3, "mode": "standard"}, max_pool_connections=32))


def measure(s3, bucket: str, size: int, threads: int, total: int) -> dict:
    """PUT then GET ``total`` bytes as objects of ``size`` with ``threads`` in flight."""
    count = max(threads, total // size)
    body = os.urandom(size)
    keys = [f"bench/{size}/{threads}/{i:05d}-{uuid.uuid4().hex[:8]}" for i in range(count)]

    def put(key):
        s3.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")

    def get(key):
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert len(data) == size, (key, len(data))

    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(put, keys))
        t1 = time.perf_counter()
        list(pool.map(get, keys))
        t2 = time.perf_counter()
    for start in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start:start + 1000]],
                                                 "Quiet": True})
    moved = count * size / MiB
    return {"object_bytes": size, "threads": threads, "objects": count,
            "put_mib_s": round(moved / (t1 - t0), 1), "get_mib_s": round(moved / (t2 - t1), 1),
            "put_seconds": round(t1 - t0, 3), "get_seconds": round(t2 - t1, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.s3_endpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4M,32M", help="object sizes (default 4M,32M: blockvault's pack sizes)")
    p.add_argument("--threads", default="1,4", help="requests in flight (default 1,4)")
    p.add_argument("--total", default="256M", help="bytes per measurement (default 256M; memstore holds them in RAM)")
    p.add_argument("--port-base", type=int, default=27400, help="for the cluster this starts (default 27400)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    total = parse_size(args.total)

    cluster_dir = None
    result: dict = {"cluster_start_seconds": None}
    env = os.environ
    if not env.get("BLOCKVAULT_S3_ENDPOINT"):
        cluster_dir = tempfile.mkdtemp(prefix="bvb", dir="/tmp")
        t0 = time.perf_counter()
        subprocess.run([os.path.join(ROOT, "tools", "ceph-s3.sh"), "up", cluster_dir, str(args.port_base)],
                       check=True, stdout=sys.stderr)
        result["cluster_start_seconds"] = round(time.perf_counter() - t0, 2)
        env = dict(line.split("=", 1) for line in open(os.path.join(cluster_dir, "s3.env")).read().split())
    try:
        s3 = client(env["BLOCKVAULT_S3_ENDPOINT"], env.get("BLOCKVAULT_S3_ACCESS_KEY_ID"),
                    env.get("BLOCKVAULT_S3_SECRET_ACCESS_KEY"), env.get("BLOCKVAULT_S3_REGION", "us-east-1"))
        bucket = f"bv-bench-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(Bucket=bucket)
        result["endpoint"] = env["BLOCKVAULT_S3_ENDPOINT"]
        result["runs"] = []
        for size in sizes:
            for n in threads:
                run = measure(s3, bucket, size, n, total)
                result["runs"].append(run)
                print(f"{size // MiB:>4} MiB x {n} threads: PUT {run['put_mib_s']:7.1f} MiB/s   "
                      f"GET {run['get_mib_s']:7.1f} MiB/s   ({run['objects']} objects)", flush=True)
        s3.delete_bucket(Bucket=bucket)
    finally:
        if cluster_dir:
            subprocess.run([os.path.join(ROOT, "tools", "ceph-s3.sh"), "down", cluster_dir], stdout=sys.stderr)
    if result["cluster_start_seconds"] is not None:
        print(f"cluster start: {result['cluster_start_seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
