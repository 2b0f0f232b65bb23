"""A fleet of real daemon processes on one bucket: a replica killed with SIGKILL mid-batch,
and the S3 server stopped under the whole fleet for 30 seconds. Nothing is lost, nothing
is published twice, and the engine reads each document about once."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig
from conftest import leftovers, pid_alive
from rudocs import normalise, ru_pdf
from waiting import eventually_sync

from watcher.bucket.names import Names
from watcher.cli.embedded import SeaweedS3, free_ports

ROOT = Path(__file__).parent.parent
BUCKET = "fleet"
# The defaults: input/, output/, .watcher/leases/.
_NAMES = Names("input/", "output/", ".watcher/leases/", "done/")
FLEET_LISTER_LEASE = _NAMES.lease(_NAMES.lister_key)
MAX_INFLIGHT = 2


@pytest.fixture
def fleet_weed(tmp_path: Path) -> Iterator[SeaweedS3]:
    """A SeaweedFS of the test's own: stopped and started again on the same data and ports."""
    server = SeaweedS3(data_dir=tmp_path / "weed", buckets=(BUCKET,))
    server.start()
    yield server
    server.cleanup()


def s3_client(server: SeaweedS3) -> Any:
    return boto3.client(
        "s3", endpoint_url=server.endpoint, region_name="ru-central-1",
        aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
        config=BotoConfig(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"total_max_attempts": 3},
            connect_timeout=2, read_timeout=10, max_pool_connections=16,
        ),
    )


# -- documents -------------------------------------------------------------------------------------

def known_line(i: int) -> str:
    return f"Документ номер {i} / document {i}"


def document(i: int) -> bytes:
    # Two lines, well over the 32 visible characters that make a text layer trusted.
    return ru_pdf([[known_line(i), f"Контрольная строка {i * 7919} для проверки слоя"]])


def rel_of(i: int) -> str:
    return f"fleet/doc-{i:03d}.pdf"


def documents(count: int) -> dict[str, bytes]:
    # fontTools logs every font subset at INFO; captured by pytest, that triples the time.
    fonttools = logging.getLogger("fontTools")
    level = fonttools.level
    fonttools.setLevel(logging.WARNING)
    try:
        return {f"input/{rel_of(i)}": document(i) for i in range(count)}
    finally:
        fonttools.setLevel(level)


def upload_all(s3: Any, bodies: dict[str, bytes]) -> dict[str, str]:
    """Uploaded concurrently; source key -> ETag."""
    def put(item: tuple[str, bytes]) -> tuple[str, str]:
        key, body = item
        return key, s3.put_object(Bucket=BUCKET, Key=key, Body=body)["ETag"].strip('"')

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(put, bodies.items()))


def list_keys(s3: Any, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys


def result_jsons(keys: list[str]) -> list[str]:
    return [k for k in keys if k.endswith(".json") and not k.endswith(".error.json")]


def error_records(keys: list[str]) -> list[str]:
    return [k for k in keys if k.endswith(".error.json")]


def count_results(s3: Any) -> int:
    with contextlib.suppress(Exception):  # S3 may be down: no count this round
        return len(result_jsons(list_keys(s3, "output/")))
    return -1


# -- replicas --------------------------------------------------------------------------------------

@dataclass
class Replica:
    index: int
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes]
    health_seen: list[dict[str, Any]] = field(default_factory=list)

    @property
    def replica_id(self) -> str:
        return f"replica-{self.index}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                found.append(event)
        return found


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDRU_", "WATCHER_"))}
    env.update(extra)
    return env


def start_replica(server: SeaweedS3, index: int, tmp_path: Path, port: int, **extra: str) -> Replica:
    work = tmp_path / f"work-{index}"
    work.mkdir(exist_ok=True)
    env = base_env(
        CLOUDRU_S3_ENDPOINT=server.endpoint, CLOUDRU_S3_BUCKET=BUCKET,
        CLOUDRU_S3_ACCESS_KEY=server.access_key, CLOUDRU_S3_SECRET_KEY=server.secret_key,
        WATCHER_REPLICA_ID=f"replica-{index}", WATCHER_HTTP_HOST="127.0.0.1",
        WATCHER_HTTP_PORT=str(port), WATCHER_POLL_INTERVAL="1", WATCHER_LEASE_SECONDS="10",
        WATCHER_LOG_FORMAT="json", WATCHER_MAX_INFLIGHT_DOCUMENTS=str(MAX_INFLIGHT),
        WATCHER_ENGINE_CONCURRENCY="1", WATCHER_TEMP_DIR=str(work), **extra,
    )
    log_path = tmp_path / f"replica-{index}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "watcher", "run"], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Replica(index, port, log_path, proc)


def start_fleet(server: SeaweedS3, count: int, tmp_path: Path, **extra: str) -> list[Replica]:
    return [start_replica(server, i, tmp_path, port, **extra)
            for i, port in enumerate(free_ports(count))]


def http_get(url: str, timeout: float = 5) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        with contextlib.suppress(ValueError):
            return exc.code, json.loads(body)
        return exc.code, body


class ReplicaExited(AssertionError):
    """A replica ended while the test waited for something."""


def wait_until(what: str, check: Callable[[], bool], timeout: float, replicas: list[Replica],
               every: float = 0.5) -> None:
    """`eventually_sync(check)`; fail with the replicas' log tails when it never holds or one dies."""
    def holds() -> bool:
        if check():
            return True
        for r in replicas:
            if r.proc.poll() is not None:
                raise ReplicaExited(f"{r.replica_id} exited {r.proc.returncode} while waiting for "
                                    f"{what}:\n{r.log_tail()}")
        return False

    try:
        eventually_sync(holds, timeout, what, every)
    except ReplicaExited:
        raise
    except AssertionError as exc:
        tails = "\n".join(f"--- {r.replica_id}\n{r.log_tail(15)}" for r in replicas)
        raise AssertionError(f"{exc}\n{tails}") from None


def is_ready(replica: Replica) -> bool:
    try:
        return http_get(replica.url("/ready"), timeout=2)[0] == 200
    except OSError:
        return False


def wait_ready(replicas: list[Replica], timeout: float = 120) -> None:
    for r in replicas:
        wait_until(f"{r.replica_id} /ready", lambda r=r: is_ready(r), timeout, replicas)


def stop_gracefully(replicas: list[Replica], timeout: float = 60) -> dict[str, int | None]:
    """SIGTERM to all at once, then each one's exit code."""
    for r in replicas:
        if r.proc.poll() is None:
            r.proc.send_signal(signal.SIGTERM)
    codes: dict[str, int | None] = {}
    for r in replicas:
        try:
            codes[r.replica_id] = r.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            codes[r.replica_id] = None
    return codes


def kill_all(replicas: list[Replica]) -> None:
    for r in replicas:
        if r.proc.poll() is None:
            r.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.proc.wait(timeout=10)


def engine_runs(replicas: list[Replica]) -> dict[str, int]:
    return {r.replica_id: sum(e.get("event") == "document_fetched" for e in r.events())
            for r in replicas}


def fetched_keys(replicas: list[Replica]) -> dict[str, list[str]]:
    """Source key -> the replicas that fetched it, in log order."""
    by_key: dict[str, list[str]] = {}
    for r in replicas:
        for e in r.events():
            if e.get("event") == "document_fetched":
                by_key.setdefault(str(e.get("key")), []).append(r.replica_id)
    return by_key


def check_results(s3: Any, etags: dict[str, str]) -> None:
    """Exactly one result per document, none other; each for the uploaded version, with its text."""
    keys = list_keys(s3, "output/")
    assert error_records(keys) == []
    expected = {f"output/{key.removeprefix('input/')}.json": key for key in etags}
    jsons = result_jsons(keys)
    assert len(jsons) == len(set(jsons)) == len(expected)
    assert set(jsons) == set(expected)
    assert {k for k in keys if k.endswith(".md")} == {k[:-len(".json")] + ".md" for k in expected}

    def read(key: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        return data

    with ThreadPoolExecutor(8) as pool:
        results = dict(zip(expected, pool.map(read, expected), strict=True))
    for result_key, result in results.items():
        source = expected[result_key]
        assert result["source"]["key"] == source
        assert result["source"]["etag"].strip('"') == etags[source], result_key
    # Each document was uploaded once: a result "re-pointed" from its own version means a
    # second replica ran it again after it was published.
    reused = {k: r["reused"] for k, r in results.items() if "reused" in r}
    assert reused == {}, reused
    # Content: a sample spread over the batch (the text layer is exact, so the line is there).
    sample = sorted(expected)[:: max(1, len(expected) // 30)]
    for result_key in sample:
        result = results[result_key]
        i = int(result_key.rsplit("doc-", 1)[1].split(".")[0])
        text = normalise(" ".join(b["text"] for p in result["pages"] for b in p["blocks"]))
        assert known_line(i) in text, (result_key, text)
        assert known_line(i) in normalise(result["markdown"]), result_key


# -- the tests -------------------------------------------------------------------------------------

@pytest.mark.timeout(290)
def test_three_replicas_one_killed_mid_batch(fleet_weed: SeaweedS3, tmp_path: Path) -> None:
    count = 300
    s3 = s3_client(fleet_weed)
    replicas = start_fleet(fleet_weed, 3, tmp_path)
    try:
        # Generating the documents overlaps the replicas' warm-up.
        started = time.monotonic()
        bodies = documents(count)
        wait_ready(replicas)
        etags = upload_all(s3, bodies)
        print(f"3 replicas ready and {count} documents uploaded in {time.monotonic() - started:.1f} s")

        wait_until("60 results", lambda: count_results(s3) >= 60, 180, replicas, every=0.2)
        holder = None
        with contextlib.suppress(s3.exceptions.NoSuchKey):
            lister = json.loads(s3.get_object(Bucket=BUCKET, Key=FLEET_LISTER_LEASE)["Body"].read())
            holder = str(lister.get("owner"))
        victim = next((r for r in replicas if r.replica_id == holder), replicas[0])
        # Kill it while it has documents in flight (it has, unless the backlog ran dry: then
        # it is killed after 10 s all the same, and the mid-batch assertion below decides).
        workers: list[int] = []

        def busy() -> bool:
            status, health = http_get(victim.url("/health"))
            workers[:] = [w["pid"] for w in health["engine"].get("workers", []) if w.get("pid")]
            return status == 200 and health["inflight_documents"] > 0

        with contextlib.suppress(AssertionError):
            eventually_sync(busy, 10, f"documents in flight in {victim.replica_id}", every=0.05)
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(timeout=10)
        done_at_kill = count_results(s3)
        held = [k for k in list_keys(s3, ".watcher/leases/") if k.endswith(".lease")]
        print(f"killed {victim.replica_id} (lister lease holder: {holder}) with {done_at_kill} "
              f"results out, {len(held)} lease objects in the bucket")
        assert done_at_kill < count, "the kill must land mid-batch"
        survivors = [r for r in replicas if r is not victim]

        wait_until(f"all {count} results", lambda: count_results(s3) >= count, 240, survivors)
        runs = engine_runs(replicas)
        total = sum(runs.values())
        twice = {k: v for k, v in fetched_keys(replicas).items() if len(v) > 1}
        print(f"engine runs per replica: {runs}; fetched more than once: {twice}")
        check_results(s3, etags)
        assert total <= count + MAX_INFLIGHT, (runs, twice)
        # Every fetched-twice document is one the victim had in flight.
        assert all(victim.replica_id in who for who in twice.values()), twice
        assert all(runs[r.replica_id] > 0 for r in survivors), runs

        codes = stop_gracefully(survivors)
        assert codes == {r.replica_id: 0 for r in survivors}, (codes, [r.log_tail() for r in survivors])
        # Only the dead replica's own leases may be left (of documents it published but
        # never let go, or its lister lease if nobody needed it since): the lister sweeps
        # such leases after three lease periods (tests/test_listing.py), the lister lease
        # is taken over by the next lister. Every survivor cleaned up after itself.
        owners = {key: json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())["owner"]
                  for key in leftovers(s3, BUCKET)}
        assert set(owners.values()) <= {victim.replica_id}, owners
        # The victim's engine worker did not outlive it.
        eventually_sync(lambda: not any(pid_alive(p) for p in workers), 10,
                        f"the victim's engine workers {workers} to end", every=0.2)
    finally:
        kill_all(replicas)


@pytest.mark.timeout(290)
def test_fleet_survives_the_s3_server_stopped_for_30_seconds(
    fleet_weed: SeaweedS3, tmp_path: Path
) -> None:
    count, outage = 60, 30.0
    s3 = s3_client(fleet_weed)
    replicas = start_fleet(fleet_weed, 2, tmp_path, WATCHER_S3_CONNECT_TIMEOUT="1",
                           WATCHER_S3_READ_TIMEOUT="10")
    try:
        bodies = documents(count)
        wait_ready(replicas)
        etags = upload_all(s3, bodies)
        wait_until("first results", lambda: count_results(s3) >= 6, 120, replicas, every=0.1)

        done_at_stop = count_results(s3)
        fleet_weed.stop()
        stopped = time.monotonic()
        answered: dict[str, list[tuple[int, bool | None]]] = {r.replica_id: [] for r in replicas}
        while time.monotonic() - stopped < outage:
            for r in replicas:
                assert r.proc.poll() is None, r.log_tail()
                status, health = http_get(r.url("/health"), timeout=5)
                reachable = health["s3"]["reachable"] if status == 200 else None
                answered[r.replica_id].append((status, reachable))
            time.sleep(1)
        fleet_weed.start()
        print(f"S3 down for {time.monotonic() - stopped:.1f} s, {done_at_stop} results out before")

        for r in replicas:
            seen = answered[r.replica_id]
            assert seen and all(status == 200 for status, _ in seen), (r.replica_id, seen)
            assert any(reachable is False for _, reachable in seen), (r.replica_id, seen)

        s3 = s3_client(fleet_weed)
        wait_until(f"all {count} results", lambda: count_results(s3) >= count, 180, replicas)
        wait_ready(replicas, timeout=60)
        check_results(s3, etags)
        runs = engine_runs(replicas)
        print(f"engine runs per replica: {runs}")

        codes = stop_gracefully(replicas)
        assert codes == {r.replica_id: 0 for r in replicas}, (codes, [r.log_tail() for r in replicas])
        assert leftovers(s3, BUCKET) == []
    finally:
        kill_all(replicas)
