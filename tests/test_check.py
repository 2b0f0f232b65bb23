"""`watcher check` against the real SeaweedFS: what passes, and each failure named."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from conftest import lenient_store

from watcher.cli.check import Checker
from watcher.cli.embedded import SeaweedS3
from watcher.core.settings import load_settings


def env_for(weed: SeaweedS3, bucket: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDRU_", "WATCHER_"))}
    env.update(CLOUDRU_S3_ENDPOINT=weed.endpoint, CLOUDRU_S3_BUCKET=bucket,
               CLOUDRU_S3_ACCESS_KEY=weed.access_key, CLOUDRU_S3_SECRET_KEY=weed.secret_key)
    env.update(extra)
    return env


def check_cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "watcher", "check"], env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_ready_configuration_passes_every_probe(weed: SeaweedS3, bucket: str, s3: Any) -> None:
    proc = check_cli(env_for(weed, bucket))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 8 and all(line.startswith("ok ") for line in lines), lines
    assert "conditional writes" in proc.stdout and "Tesseract rus+eng" in proc.stdout
    # Its probe objects are gone.
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_a_wrong_secret_is_named_and_the_rest_skipped(weed: SeaweedS3, bucket: str) -> None:
    wrong = "not-the-secret-0f3c9a"
    proc = check_cli(env_for(weed, bucket, CLOUDRU_S3_SECRET_KEY=wrong))
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("FAIL S3") and "SignatureDoesNotMatch" in lines[0]
    assert "CLOUDRU_S3_SECRET_KEY" in lines[0]
    assert all(line.startswith("skip") for line in lines[1:-1]), lines
    assert wrong not in proc.stdout + proc.stderr


def test_bad_settings_exit_2_before_probing(weed: SeaweedS3, bucket: str) -> None:
    proc = check_cli(env_for(weed, bucket, WATCHER_HTTP_PORT="eighty"))
    assert proc.returncode == 2 and "WATCHER_HTTP_PORT" in proc.stderr and proc.stdout == ""


async def run_checker(weed: SeaweedS3, bucket: str, endpoint: str | None = None, **values: Any) -> Checker:
    settings = load_settings(s3_endpoint=endpoint or weed.endpoint, s3_bucket=bucket,
                             s3_access_key=weed.access_key, s3_secret_key=weed.secret_key,
                             s3_max_attempts=1, **values)
    checker = Checker(settings)
    await checker.run()
    return checker


def by_state(checker: Checker) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for probe in checker.probes:
        found.setdefault(probe.state, []).append(f"{probe.what}: {probe.detail}")
    return found


async def test_a_missing_bucket_and_an_absent_vlm_server_are_named(weed: SeaweedS3) -> None:
    checker = await run_checker(weed, "no-such-bucket-here", engine="openai-vlm",
                                vlm_url="http://127.0.0.1:9/v1")
    failed = by_state(checker)["FAIL"]
    assert any("bucket 'no-such-bucket-here'" in f and "CLOUDRU_S3_BUCKET" in f for f in failed)
    assert any("engine openai-vlm" in f and "WATCHER_VLM_URL" in f for f in failed)
    assert checker.probes[0].state == "ok"  # the credentials themselves are fine


async def test_a_store_that_ignores_conditional_writes_is_told_to_use_shards(
    weed: SeaweedS3, bucket: str
) -> None:
    async with lenient_store(weed) as endpoint:
        checker = await run_checker(weed, bucket, endpoint=endpoint)
    failed = by_state(checker).get("FAIL", [])
    assert len(failed) == 1 and "conditional writes" in failed[0], failed
    assert "WATCHER_CLAIM_MODE=shard" in failed[0]
