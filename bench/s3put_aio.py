"""The comparison of bench/s3put.py: the same PUTs and HEADs through aiobotocore on an
asyncio loop (one thread), ``concurrency`` requests in flight at a time.

Run by ``bench/s3put.py --aiobotocore PYTHON``, with an interpreter that has
aiobotocore (it pins botocore to its own range, which is not LightMail's: a venv of
its own).  Prints one JSON line per (size, concurrency), as bench/s3put.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import resource
import time


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(args: argparse.Namespace, size: int, concurrency: int) -> dict:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session
    session = get_session()
    config = AioConfig(s3={"addressing_style": "path"}, max_pool_connections=concurrency,
                       request_checksum_calculation="when_required",
                       response_checksum_validation="when_required")
    async with session.create_client(
            "s3", endpoint_url=args.endpoint, region_name="us-east-1",
            aws_access_key_id=args.access, aws_secret_access_key=args.secret,
            config=config) as client:
        contents = [os.urandom(16) + b"x" * (size - 16) for _ in range(args.count)]
        keys = [f"aio{size}x{concurrency}/{hashlib.sha256(c).hexdigest()}" for c in contents]
        gate = asyncio.Semaphore(concurrency)

        async def put(key: str, data: bytes) -> None:
            async with gate:
                await client.put_object(
                    Bucket=args.bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=base64.b64encode(hashlib.sha256(data).digest()).decode())

        wall, used = time.monotonic(), cpu()
        await asyncio.gather(*(put(k, c) for k, c in zip(keys, contents, strict=True)))
        put_wall, put_cpu = time.monotonic() - wall, cpu() - used
        wall, used = time.monotonic(), cpu()
        for key in keys:
            await client.head_object(Bucket=args.bucket, Key=key)
        head_wall, head_cpu = time.monotonic() - wall, cpu() - used
    return {"client": "aiobotocore", "size": size, "threads": concurrency,
            "count": args.count, "puts_per_s": round(args.count / put_wall, 1),
            "cpu_ms_per_put": round(1000 * put_cpu / args.count, 2),
            "head_ms": round(1000 * head_wall / args.count, 2),
            "cpu_ms_per_head": round(1000 * head_cpu / args.count, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("endpoint", "access", "secret", "bucket", "sizes", "concurrency"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--count", type=int, default=400)
    args = parser.parse_args()
    for size in map(int, args.sizes.split(",")):
        for concurrency in map(int, args.concurrency.split(",")):
            print(json.dumps(asyncio.run(run(args, size, concurrency))), flush=True)


if __name__ == "__main__":
    main()
