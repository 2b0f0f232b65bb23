"""The S3 server goes away and comes back: the daemon recovers by itself, losing nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import GatedEngine, daemon_running, make_settings, wait_for_keys
from docgen import make_image, make_pdf
from waiting import eventually

from watcher.cli.embedded import SeaweedS3


@pytest.fixture
def own_weed(tmp_path: Path) -> Iterator[SeaweedS3]:
    server = SeaweedS3(data_dir=tmp_path / "weed", buckets=("outage",))
    server.start()
    yield server
    server.cleanup()


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json()


async def test_daemon_recovers_when_s3_stops_and_starts(own_weed: SeaweedS3) -> None:
    s3 = own_weed.sync_client()
    s3.put_object(Bucket="outage", Key="input/before.png", Body=make_image(["Before outage"], "PNG"))
    s3.put_object(Bucket="outage", Key="input/during.pdf",
                  Body=make_pdf([["In flight during outage"], ["second page"]]))
    settings = make_settings(own_weed, "outage", poll_interval=0.3, max_inflight_documents=1,
                             s3_max_attempts=2)
    engine = GatedEngine()
    async with daemon_running(settings, engine) as daemon:
        base = f"http://127.0.0.1:{daemon.http.port}"
        await asyncio.wait_for(engine.entered.wait(), 60)
        # A page is being recognised; now S3 disappears under the daemon's feet.
        await asyncio.to_thread(own_weed.stop)
        engine.gate.set()
        answers: list[Any] = []

        async def ready_says_s3_down() -> bool:
            status, body = await get_json(f"{base}/ready")
            answers.append(body)
            return status == 503 and any("S3" in r for r in body["reasons"])

        try:
            await eventually(ready_says_s3_down, 30, "/ready to report S3 down", every=0.2)
        except AssertionError:
            raise AssertionError(f"/ready never reported S3 down: {answers[-1]}") from None
        status, health = await get_json(f"{base}/health")
        assert status == 200 and health["s3"]["reachable"] is False
        assert settings.s3_secret_key.get_secret_value() not in str(health)

        await asyncio.to_thread(own_weed.start)
        s3 = own_weed.sync_client()
        s3.put_object(Bucket="outage", Key="input/after.png", Body=make_image(["After outage"], "PNG"))
        await wait_for_keys(
            s3, "outage",
            ["output/before.png.json", "output/during.pdf.json", "output/after.png.json"],
        )
        status, _ = await get_json(f"{base}/ready")
        assert status == 200
    listing = s3.list_objects_v2(Bucket="outage", Prefix="output/")["Contents"]
    assert not any(o["Key"].endswith(".error.json") for o in listing)


async def test_wrong_credentials_are_reported_on_ready_without_error_records(
    weed: SeaweedS3, bucket: str
) -> None:
    s3 = weed.sync_client()
    s3.put_object(Bucket=bucket, Key="input/a.png", Body=make_image(["Waiting for keys"], "PNG"))
    wrong = "definitely-the-wrong-secret-123"
    settings = make_settings(weed, bucket, s3_secret_key=wrong)
    async with daemon_running(settings) as daemon:
        base = f"http://127.0.0.1:{daemon.http.port}"
        await daemon.wait_polls(2, timeout=30)
        status, body = await get_json(f"{base}/ready")
        health_status, health = await get_json(f"{base}/health")
    assert status == 503 and health_status == 200
    reason = " ".join(body["reasons"])
    assert "refused" in reason and "CLOUDRU_S3_SECRET_KEY" in reason
    assert wrong not in str(body) + str(health)
    assert s3.list_objects_v2(Bucket=bucket, Prefix="output/").get("KeyCount", 0) == 0
