"""bench/scaling.py's counting pieces, and the benchmark itself in its ``--smoke`` mode,
so that it cannot rot unnoticed: the S3 server's request count, the Redis monitor that
tells a client's requests from the commands its scripts call, the parse of a node's
metrics, and a two-node run whose counts a message are checked against what a
message must cost (one upload, at least one group commit and one Redis request)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import free_port

from tests.s3server import S3Server, SeaweedFS

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from counters import PrivateRedis, metric_counts  # noqa: E402


def test_the_s3_server_counts_requests_by_kind() -> None:
    s3 = S3Server()
    try:
        client = s3.client()
        before = s3.requests()
        client.put_object(Bucket=s3.bucket, Key="a/b", Body=b"x")
        client.head_object(Bucket=s3.bucket, Key="a/b")
        assert client.get_object(Bucket=s3.bucket, Key="a/b")["Body"].read() == b"x"
        client.list_objects_v2(Bucket=s3.bucket)
        client.delete_object(Bucket=s3.bucket, Key="a/b")
        assert s3.requests() - before == {"PUT": 1, "HEAD": 1, "GET": 1, "LIST": 1,
                                          "DELETE": 1}
    finally:
        s3.stop()


def test_seaweedfs_counts_requests_by_kind(tmp_path: Path) -> None:
    s3 = SeaweedFS(tmp_path / "weed", metrics=True)
    try:
        client = s3.client()
        before = s3.requests()
        client.put_object(Bucket=s3.bucket, Key="a/b", Body=b"x")
        client.head_object(Bucket=s3.bucket, Key="a/b")
        assert client.get_object(Bucket=s3.bucket, Key="a/b")["Body"].read() == b"x"
        assert s3.requests() - before == {"PUT": 1, "GET": 2}      # the HEAD a GET
    finally:
        s3.stop()


def test_the_redis_monitor_counts_requests_not_what_scripts_call() -> None:
    try:
        redis = PrivateRedis(free_port())
    except SystemExit as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        redis.watch_requests()
        redis.command("EVAL", "redis.call('SET', KEYS[1], '1'); "
                      "return redis.call('PUBLISH', 'c', 'x')", "1", "k")
        redis.command("PING")
        stats = redis.commandstats()
        assert stats["set"][0] == 1 and stats["publish"][0] == 1    # counted by Redis...
        for _ in range(50):                 # ...but not requests: the monitor's view
            if redis.requests()["ping"]:
                break
            time.sleep(0.1)
        requests = redis.requests()
        requests.pop("info", None)
        assert requests == {"eval": 1, "ping": 1}
    finally:
        redis.stop()


def test_group_commits_and_sql_calls_are_read_from_the_metrics() -> None:
    text = ("# HELP lightmail_group_commit_size Requests committed together\n"
            "lightmail_group_commit_size_bucket{le=\"1.0\"} 3.0\n"
            "lightmail_group_commit_size_count 4.0\n"
            "lightmail_group_commit_size_sum 9.0\n"
            "lightmail_sql_seconds_count{kind=\"read\"} 12.0\n"
            "lightmail_sql_seconds_count{kind=\"write\"} 2.0\n")
    assert metric_counts(text) == {"groups": 4, "grouped": 9, "sql read": 12,
                                   "sql write": 2}


def test_the_benchmark_runs_two_nodes_and_counts_what_a_message_costs(
        tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    # From another directory: a new interpreter puts the current one on its path.
    result = subprocess.run([sys.executable, str(BENCH / "scaling.py"), "--smoke",
                             "--json", str(out)], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads(out.read_text())
    runs = found["runs"]
    assert [run["nodes"] for run in runs] == [1, 2]
    for run in runs:
        smtp = run["smtp"]
        counts = {key: value / smtp["messages"] for key, value in
                  smtp["costs"]["counts"].items()}
        assert counts["s3 PUT"] == 1.0, counts      # each message uploaded once
        # (--smoke leaves PostgreSQL's counts little time to settle: some may be late.)
        assert counts["groups"] > 0 and counts["pg xact_commit"] > 0
        assert counts["redis requests"] >= 1.0      # each filing announced
        assert {"n1 main", "n1 writer", "postgres backends", "redis-server",
                "S3 server"} <= set(smtp["costs"]["cpu_s"])
        assert 0 < smtp["efficiency"] <= 2
        assert run["imap"]["sessions"] == run["nodes"] * found["args"]["clients"]
        assert run["smtp"]["ceilings"] and run["imap"]["ceilings"]
    assert runs[1]["smtp"]["costs"]["cpu_s"]["n2 writer"] > 0
    assert runs[1]["hearing"]["messages"] > 0 and runs[1]["hearing"]["hearing_main_ms"] >= 0
    assert found["units"]["pg filing transaction ms"] > 0
    assert found["units"]["s3 PUT ms"] > 0
    assert "== summary" in result.stdout
