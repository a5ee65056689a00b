"""What an upload to the S3 blob store costs the server: boto3 in the store's thread pool.

    .venv/bin/python bench/s3put.py [--count 400] [--sizes 4096,102400] [--threads 1,8]
                                    [--aiobotocore PYTHON]

Against the tests' S3 server (tests/s3server.py: moto's server mode, a process of its
own on this machine), for each size and pool size: ``count`` blobs of distinct
content made durable by the store's ``commit_staged_now`` (all at once, so the pool
runs ``threads`` uploads in parallel: what a group commit does), then one HEAD each
(``exists_now``, which each reference makes inside its SQL transaction).  Printed:
uploads a second, and the CPU time of this process (the client: signing, hashing,
HTTP) per upload and per HEAD - what LightMail's process pays.  Moto's own time is
the server's, and sets the wall-clock rates, which are not S3's.  With
``--aiobotocore PYTHON`` the same requests are made through aiobotocore on an
asyncio loop too (bench/s3put_aio.py, run by PYTHON, an interpreter that has it),
against the same server, for comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightmail.config import parse_config
from lightmail.storage.interfaces import BlobHandoff, BlobRef
from lightmail.storage.s3blobs import S3BlobStore
from tests.s3server import S3Server


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(server: S3Server, tmp: Path, size: int, threads: int, count: int) -> dict:
    config = parse_config(
        f"[server]\nstate_dir = {tmp / 'state'}\n[storage]\nblob_backend = s3\n"
        + server.config(tmp, prefix=f"b{size}x{threads}/", threads=threads,
                        timeout="30s"), str(tmp / "lm.conf"))
    store = S3BlobStore(config.s3, config.s3_spool_dir)
    try:
        contents = [os.urandom(16) + b"x" * (size - 16) for _ in range(count)]
        staged = [store.adopt(BlobHandoff(None, data, BlobRef(
            hashlib.sha256(data).hexdigest(), len(data)))) for data in contents]
        wall, used = time.monotonic(), cpu()
        errors = [error for error in store.commit_staged_now(staged) if error]
        put_wall, put_cpu = time.monotonic() - wall, cpu() - used
        assert not errors, errors[0]
        wall, used = time.monotonic(), cpu()
        assert all(store.exists_now(blob.ref.id) for blob in staged)
        head_wall, head_cpu = time.monotonic() - wall, cpu() - used
    finally:
        store.close()
    return {"size": size, "threads": threads, "count": count,
            "puts_per_s": round(count / put_wall, 1),
            "cpu_ms_per_put": round(1000 * put_cpu / count, 2),
            "head_ms": round(1000 * head_wall / count, 2),
            "cpu_ms_per_head": round(1000 * head_cpu / count, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--sizes", default="4096,102400")
    parser.add_argument("--threads", default="1,8")
    parser.add_argument("--aiobotocore", metavar="PYTHON",
                        help="also through aiobotocore, with this interpreter")
    args = parser.parse_args()
    server = S3Server()
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{'size':>8} {'threads':>7} {'PUT/s':>8} {'CPU ms/PUT':>10} "
                  f"{'HEAD ms':>8} {'CPU ms/HEAD':>11}")
            for size in map(int, args.sizes.split(",")):
                for threads in map(int, args.threads.split(",")):
                    result = run(server, Path(tmp), size, threads, args.count)
                    results.append(result)
                    print(f"{size:>8} {threads:>7} {result['puts_per_s']:>8} "
                          f"{result['cpu_ms_per_put']:>10} {result['head_ms']:>8} "
                          f"{result['cpu_ms_per_head']:>11}", flush=True)
            if args.aiobotocore:
                out = subprocess.run(
                    [args.aiobotocore, str(Path(__file__).with_name("s3put_aio.py")),
                     "--endpoint", server.endpoint, "--access", server.access_key,
                     "--secret", server.secret_key, "--bucket", server.bucket,
                     "--sizes", args.sizes, "--concurrency", args.threads,
                     "--count", str(args.count)],
                    capture_output=True, text=True, check=True).stdout
                print("aiobotocore (concurrency in place of threads):")
                for line in out.splitlines():
                    result = json.loads(line)
                    results.append(result)
                    print(f"{result['size']:>8} {result['threads']:>7} "
                          f"{result['puts_per_s']:>8} {result['cpu_ms_per_put']:>10} "
                          f"{result['head_ms']:>8} {result['cpu_ms_per_head']:>11}",
                          flush=True)
    finally:
        server.stop()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
