"""A deterministic simulation of the claim/fetch/publish/settle protocol, replayable by seed.

Several replicas of the real code (discovery, the fleet's lister and followers, the work
queue, the worker pool, the document pipeline with its leases, publisher and settling)
run against the in-memory S3 of tests/memory_s3.py, on one event loop whose clock is
virtual: time jumps to the next timer, and nothing runs on a thread, so one seed gives
one interleaving, every time. The seed draws:

- producers that upload new versions of a few keys (some empty, some that crash the
  engine every time, some the same bytes again, some with multipart ETags), overwrite
  them while they are read, and delete them;
- faults on every S3 request (5xx, throttling, a response lost after the write was
  applied, a GET body cut half-way, latency), and stores that ignore conditional DELETE
  or copy (the HEAD-and-compare fallback);
- notifications (`POST /events` bodies) dropped, duplicated, delayed and so reordered,
  and sometimes naming a wrong size;
- pods killed at any step (a kill severs the replica from S3 at once, as SIGKILL would:
  nothing of it runs a `finally` against the bucket) and restarted later under a new
  process id, so their leases look dead to their successor;
- the source action (keep, move, delete) and clocks a little apart.

Only the engine is a stand-in (`SimReader`: it checks it got exactly the bytes of the
version it was asked for, takes some virtual time, and reads the bytes as text).

After the producers stop, the replicas run on until the bucket is quiet, are drained, and
the invariants are checked (`Simulation.violations`):

1. every live key's newest version has exactly its result, or its error record;
2. no result ever moves back to an older version of its source;
3. no source version is moved or deleted unless that exact version has its result;
4. the engine reads a version at most once per upload of it, plus once per death of a
   replica while it was in flight there and per run that ended to be retried (S3 away,
   a crash, a lost lease); never twice at once;
5. no lease is left once the fleet is quiet and drained;
6. nothing is written outside the output, lease and (for `move`) done prefixes.

A failing seed prints its violations and the tail of a trace of everything that
happened; `python bench/simulate.py --seed N --trace` replays it.
"""

from __future__ import annotations

import asyncio
import json
import random
import selectors
import tempfile
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote_plus

import structlog
from memory_s3 import Faults, MemoryClient, MemoryS3, Request

from watcher.bucket.names import SOURCE_ETAG_META, Names
from watcher.bucket.storage import Conditions, Storage
from watcher.core.errors import DocumentError, EngineCrashed, ErrorCode
from watcher.core.identity import Identity
from watcher.core.metrics import Metrics, StageTimer
from watcher.core.outcome import Outcome, Report
from watcher.core.pages import Block, PageResult
from watcher.core.refs import ObjectRef
from watcher.core.settings import Settings, SourceAction, load_settings
from watcher.intake.discovery import Discovery
from watcher.intake.events import EventIntake
from watcher.intake.fleet import FleetDiscovery
from watcher.intake.queue import WorkQueue
from watcher.pipeline.budget import PageBudget, Ticket
from watcher.pipeline.document import DocumentPipeline, Parts
from watcher.pipeline.recognise import EVERYTHING_AT_ONCE, Reading, ReadPlan, blamed_page, unreadable
from watcher.service.hooks import HeldRetry
from watcher.service.poller import Poller
from watcher.service.workers import WorkerPool

T = TypeVar("T")
BUCKET = "sim"
EPOCH = 1_800_000_000.0  # the virtual wall clock starts here


# --- a loop with a virtual clock --------------------------------------------------------
class Stalled(RuntimeError):
    """Nothing left to run and no timer set: the simulation would wait for ever."""


class _VirtualSelector(selectors.BaseSelector):
    """Never waits: a `select` with a timeout moves the clock on by it instead."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self._map: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, fileobj if isinstance(fileobj, int) else fileobj.fileno(),
                                    events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._map.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise Stalled("no task is ready and no timer is set")
        self.clock.now += max(0.0, timeout)
        return []

    def get_map(self) -> Any:
        return self._map

    def close(self) -> None:
        self._map.clear()


@dataclass
class VirtualClock:
    now: float = 0.0

    def wall(self) -> float:
        return EPOCH + self.now


class VirtualLoop(asyncio.SelectorEventLoop):
    """asyncio on virtual time; `run_in_executor` runs the function at once, inline."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        super().__init__(_VirtualSelector(clock))

    def time(self) -> float:
        return self.clock.now

    def run_in_executor(self, executor: Any, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.create_future()
        try:
            future.set_result(func(*args))
        except BaseException as exc:  # handed to the awaiting task, as an executor would
            future.set_exception(exc)
        return future


# --- the world ----------------------------------------------------------------------------
class ReplicaDead(BaseException):
    """Raised into whatever a killed replica still tries to send: it reaches nothing."""


class SeveredClient:
    """A replica's S3 client; once severed (the pod was killed) every request fails."""

    def __init__(self, client: MemoryClient) -> None:
        self.client = client
        self.dead = False

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.client, name)

        async def guarded(**kwargs: Any) -> Any:
            if self.dead:
                raise ReplicaDead(name)
            answer = await call(**kwargs)
            if self.dead:
                raise ReplicaDead(name)
            return answer

        return guarded


@dataclass
class SimConfig:
    seed: int
    replicas: int = 3
    keys: int = 4
    actions: int = 18
    action_gap: float = 3.0  # mean virtual seconds between producer actions
    deaths: int = 2
    engine_seconds: float = 1.5  # mean virtual seconds a document is read
    lease_seconds: float = 10.0
    poll_interval: float = 2.0
    quiet_seconds: float = 150.0  # after the last action: time for everything to settle
    action: SourceAction = SourceAction.KEEP
    faults: Faults = field(default_factory=Faults)
    drop: float = 0.3  # chance a notification is lost
    duplicate: float = 0.3  # chance it is delivered twice
    wrong_size: float = 0.3  # chance it names a wrong size

    @classmethod
    def drawn(cls, seed: int) -> SimConfig:
        rng = random.Random(seed * 7919 + 1)
        ignored = frozenset(name for name in ("delete", "copy") if rng.random() < 0.25)
        return cls(
            seed=seed,
            replicas=rng.choice((1, 2, 3, 3)),
            keys=rng.randint(2, 5),
            actions=rng.randint(8, 24),
            deaths=rng.choice((0, 1, 2, 3)),
            action=rng.choice(list(SourceAction)),
            faults=Faults(server_error=rng.choice((0.0, 0.02, 0.05)),
                          throttle=rng.choice((0.0, 0.02)),
                          lost_response=rng.choice((0.0, 0.02, 0.05)),
                          cut_body=rng.choice((0.0, 0.1)),
                          latency=rng.choice((0.0, 0.02, 0.2)),
                          ignored_conditions=ignored),
        )


@dataclass
class Upload:
    at: float
    etag: str
    body: bytes


class SimReader:
    """The engine's stand-in: checks the bytes, takes virtual time, reads them as text."""

    def __init__(self, sim: Simulation, replica: Replica) -> None:
        self.sim = sim
        self.replica = replica

    def engine_id(self) -> dict[str, str]:
        return {"name": "sim", "model": "sim"}

    async def read(self, ref: ObjectRef, path: Path, size: int, timer: StageTimer,
                   ticket: Ticket, plan: ReadPlan = EVERYTHING_AT_ONCE) -> Reading:
        sim = self.sim
        version = (ref.key, ref.etag)
        if 0 in plan.skip:  # its one page was blamed for its crashes: not read again
            raise unreadable([blamed_page(0, plan.attempts)]) or AssertionError("unreachable")
        await plan.on_page(0)
        data = path.read_bytes()  # noqa: ASYNC240 - a small temp file, on virtual time
        if data != sim.bodies.get(version) or size != len(data):
            sim.violation(f"engine got {len(data)} bytes for {version}, not the version's "
                          f"{len(sim.bodies.get(version, b''))} (size said {size})")
        if version in sim.reading:
            sim.violation(f"{version} read twice at once ({sim.reading[version]} and {self.replica.label})")
        sim.runs[version] += 1
        sim.reading[version] = self.replica.label
        self.replica.reading.add(version)
        sim.log(f"{self.replica.label} engine reads {ref.key} {ref.etag[:8]} (run {sim.runs[version]})")
        try:
            await asyncio.sleep(sim.rng.expovariate(1.0 / sim.config.engine_seconds))
        finally:
            sim.reading.pop(version, None)
            self.replica.reading.discard(version)
        if not data:
            raise DocumentError(ErrorCode.EMPTY, "the object is empty (0 bytes)")
        if data.startswith(b"POISON"):
            crashed = EngineCrashed("crash", "the simulated engine dies on this document")
            crashed.page = 0  # as DocumentReader says which page it was on
            raise crashed
        text = data.decode()
        page = PageResult(0, 100, 100, [Block("text", [0.0, 0.0, 100.0, 100.0], text)], text)
        return Reading("text", [page])


class Replica:
    """One pod of the real code, on the simulation's loop and bucket."""

    def __init__(self, sim: Simulation, index: int) -> None:
        self.sim = sim
        self.name = f"r{index}"
        self.incarnation = 0
        self.skew = sim.rng.uniform(-1.0, 1.0)  # seconds its clock is off
        self.alive = False
        self.pid = 0
        self.reading: set[tuple[str, str]] = set()
        self.client: SeveredClient | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.pool: WorkerPool | None = None
        self.fleet: FleetDiscovery | None = None
        self.pipeline: DocumentPipeline | None = None
        self.intake: EventIntake | None = None
        self.queue: WorkQueue | None = None

    @property
    def label(self) -> str:
        return f"{self.name}#{self.incarnation}"

    def settings(self) -> Settings:
        return self.sim.settings.model_copy(update={"replica_id": self.name})

    def start(self) -> None:
        sim = self.sim
        self.incarnation += 1
        pid = 1000 * (int(self.name[1:]) + 1) + self.incarnation
        sim.live_pids.add(pid)
        identity = Identity(self.name, host=f"host-{self.name}", pid=pid,
                            incarnation=f"{self.name}-{self.incarnation}",
                            clock=lambda: sim.clock.wall() + self.skew, alive=sim.live_pids.__contains__)
        self.pid = pid
        settings = self.settings()
        self.client = SeveredClient(sim.s3.client(self.label))
        storage = Storage(self.client, BUCKET, settings.s3_max_attempts)
        ignored = sim.config.faults.ignored_conditions
        storage.conditions = Conditions(put=True, delete="delete" not in ignored, copy="copy" not in ignored)
        parts = Parts.of(storage, settings, identity)
        metrics = Metrics()
        budget = PageBudget(lambda: None)
        self.queue = WorkQueue(settings.queue_size)
        work_dir = Path(tempfile.mkdtemp(dir=sim.work_root, prefix=f"{self.label}-"))
        self.pipeline = DocumentPipeline(settings, parts, SimReader(sim, self), metrics, budget, work_dir)
        self.fleet = FleetDiscovery(Discovery(storage, settings, parts.names, identity.clock,
                                              parts.leases.holder_is_dead),
                                    parts.leases, storage, parts.names, shared=True)
        poller = Poller(self.queue, metrics, settings.poll_interval, lambda: set())
        self.intake = EventIntake(BUCKET, parts.names, self.queue.offer, poller.poke)

        async def ready() -> None:
            return None

        self.pool = WorkerPool(self.pipeline, self.queue, budget, metrics,
                               [self.fleet, HeldRetry(self._retry_at), _Recorder(sim, self)], ready,
                               size=2)
        self.pool.start()
        self.tasks = [asyncio.create_task(poller.run(self.fleet), name=f"{self.label}-poll")]
        self.alive = True
        sim.log(f"{self.label} started")

    def _retry_at(self, ref: ObjectRef, when: float) -> None:
        delay = max(0.0, when - self.sim.clock.wall()) + 1.0
        asyncio.get_running_loop().call_later(delay, self._urgent, ref, self.incarnation)

    def _urgent(self, ref: ObjectRef, incarnation: int) -> None:
        if self.alive and incarnation == self.incarnation and self.queue is not None:
            self.queue.offer_urgent(ref)

    def kill(self) -> None:
        """SIGKILL: cut off from S3 at once, every task gone, nothing cleaned up."""
        sim = self.sim
        assert self.client is not None and self.pool is not None
        for ref in self.pool.busy():  # in flight, whatever the stage
            sim.deaths[(ref.key, ref.etag)] += 1
        self.client.dead = True
        self.alive = False
        sim.live_pids.discard(self.pid)
        for task in [*self.tasks, *self.pool._loops]:
            task.cancel()
        sim.log(f"{self.label} KILLED with {sorted(r.key for r in self.pool.busy())} in flight")

    async def stop(self) -> None:
        """SIGTERM: drain, hand listing over, release what is left."""
        assert self.pool is not None and self.fleet is not None and self.pipeline is not None
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.pool.drain(self.sim.config.lease_seconds, asyncio.Event())
        await self.fleet.close()
        await self.pipeline.close()
        self.alive = False
        self.sim.log(f"{self.label} stopped")


class _Recorder:
    """An outcome hook: what each run came to, for the trace and invariant 4."""

    def __init__(self, sim: Simulation, replica: Replica) -> None:
        self.sim = sim
        self.replica = replica

    def ended(self, report: Report) -> None:
        version = (report.ref.key, report.ref.etag)
        self.sim.log(f"{self.replica.label} {report.outcome.value} {report.ref.key} "
                     f"{report.ref.etag[:8]} {report.code or report.message or ''}")
        if report.outcome is Outcome.RETRY:
            self.sim.retried[version] += 1


@dataclass
class Simulation:
    config: SimConfig
    trace: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.config.seed)
        self.clock = VirtualClock()
        self.s3 = MemoryS3(random.Random(self.config.seed + 1), self.config.faults, self.clock.wall)
        self.s3.watch = self._watch
        self.settings = load_settings(
            s3_endpoint="http://memory.invalid", s3_bucket=BUCKET, s3_access_key="sim:key",
            s3_secret_key="sim-secret-not-a-secret", lease_seconds=self.config.lease_seconds,
            poll_interval=self.config.poll_interval, s3_max_attempts=5, max_attempts=3,
            source_action=self.config.action, drain_seconds=self.config.lease_seconds,
        )
        self.names = Names.from_settings(self.settings)
        self.keys = [f"{self.names.input_prefix}doc-{n}.txt" for n in range(self.config.keys)]
        self.uploads: dict[str, list[Upload]] = defaultdict(list)
        self.deleted_at: dict[str, float] = {}
        self.bodies: dict[tuple[str, str], bytes] = {}
        self.runs: dict[tuple[str, str], int] = defaultdict(int)
        self.deaths: dict[tuple[str, str], int] = defaultdict(int)
        self.retried: dict[tuple[str, str], int] = defaultdict(int)
        self.reading: dict[tuple[str, str], str] = {}
        # source key -> (when the version answered was uploaded, its ETag), in write order
        self.answers: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self.live_pids: set[int] = set()
        self.replicas: list[Replica] = []
        self.stopping = False
        self.work_root = ""
        # Versions lost to the HEAD-and-compare fallback of a store that ignores
        # conditional deletes or copies: counted, not violations (see `_settling`).
        self.fallback_races: list[str] = []

    # --- trace and checks -------------------------------------------------------------
    def log(self, line: str) -> None:
        self.trace.append(f"[{self.clock.now:8.2f}] {line}")

    def violation(self, what: str) -> None:
        self.problems.append(what)
        self.log(f"VIOLATION {what}")

    @property
    def violations(self) -> list[str]:
        return self.problems

    def _watch(self, request: Request) -> None:
        """Every applied request, as it is applied: invariants 2, 3 and 6 are checked here."""
        if "/_fleet/" not in request.key:  # the lister's renewals would drown the rest
            # A result's bytes hold the real time it took to make: its ETag is not replayed.
            etag = "" if request.key.startswith(self.names.output_prefix) else (request.etag or "")[:8]
            self.log(f"{request.actor} {request.op} {request.key} {etag} {request.note}")
        if request.actor == "producer":
            return
        key, names = request.key, self.names
        inside = key.startswith((names.output_prefix, names.lease_prefix, names.done_prefix))
        if request.op == "put" and not inside:
            self.violation(f"{request.actor} wrote {key} outside its prefixes")
        if request.op in ("delete", "copy") and key.startswith(names.input_prefix):
            self._settling(request)
        if request.op == "put" and key.startswith(names.output_prefix):
            self._answered(key)

    def _settling(self, request: Request) -> None:
        source, etag = request.key, request.etag or ""
        result = self.s3.objects.get(self.names.result_json(source))
        if result is None or result.metadata.get(SOURCE_ETAG_META) != etag:
            what = f"{request.actor} {request.op} {source} {etag[:8]} without that version's result"
            if request.op in self.config.faults.ignored_conditions:
                # The store ignores the condition: the HEAD-and-compare fallback has a
                # window of one round trip in which a new upload is lost (documented).
                self.fallback_races.append(what)
                self.log(f"FALLBACK RACE {what}")
            else:
                self.violation(what)

    def _answered(self, key: str) -> None:
        """A result or error record written: it must not name an older version than the
        one the key's last answer named (the time of a version is its latest upload)."""
        sources = [s for s in self.names.sources_of(key) if s in self.uploads]
        stored = self.s3.objects[key]
        etag = stored.metadata.get(SOURCE_ETAG_META, "")
        if not sources or key.endswith(".md"):
            return
        source = sources[0]
        now = self.clock.now
        born = self._born(source, etag, now)
        if born is None:
            self.violation(f"{key} written for {etag[:8]}, which was never uploaded as {source}")
            return
        history = self.answers[source]
        if history:
            last_born, last_etag = history[-1]
            if born < last_born:
                self.violation(f"{key} moved back from {last_etag[:8]} to the older {etag[:8]}")
        history.append((born, etag))

    def _born(self, source: str, etag: str, at: float) -> float | None:
        times = [u.at for u in self.uploads[source] if u.etag == etag and u.at <= at]
        return max(times) if times else None

    # --- producers, notifications, deaths -------------------------------------------
    async def produce(self) -> None:
        rng = self.rng
        for n in range(self.config.actions):
            await asyncio.sleep(rng.expovariate(1.0 / self.config.action_gap))
            key = rng.choice(self.keys)
            roll = rng.random()
            if roll < 0.12 and key in self.s3.objects:
                self.s3.remove(key)
                self.deleted_at[key] = self.clock.now
                continue
            previous = self.s3.objects.get(key)
            if roll < 0.2 and previous is not None:
                body = previous.body  # the same bytes again: the same ETag
            elif roll < 0.27:
                body = b""
            elif roll < 0.33:
                body = f"POISON {key} {n}".encode()
            else:
                body = f"text of {key} action {n} {rng.getrandbits(32):08x}".encode()
            parts = rng.choice((0, 0, 0, 2, 3))
            etag = self.s3.put(key, body, parts=parts)
            self.bodies[(key, etag)] = body
            self.uploads[key].append(Upload(self.clock.now, etag, body))
            self.notify(key, etag, len(body))

    def notify(self, key: str, etag: str, size: int) -> None:
        rng = self.rng
        if rng.random() < self.config.wrong_size:
            size = rng.choice((0, size * 1000 + 7, 10**12))
        body = json.dumps({"Records": [{
            "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": BUCKET}, "object": {"key": quote_plus(key), "eTag": etag,
                                                          "size": size}},
        }]}).encode()
        copies = 0 if rng.random() < self.config.drop else 2 if rng.random() < self.config.duplicate else 1
        for _ in range(copies):
            target = rng.choice(self.replicas)
            delay = rng.uniform(0.0, 6.0)
            asyncio.get_running_loop().call_later(delay, self._deliver, target, body, key)

    def _deliver(self, replica: Replica, body: bytes, key: str) -> None:
        if replica.alive and replica.intake is not None:
            replica.intake.take(body)
            self.log(f"{replica.label} notified of {key}")

    async def kill_some(self, until: float) -> None:
        rng = self.rng
        for _ in range(self.config.deaths):
            await asyncio.sleep(rng.uniform(0.0, until / max(1, self.config.deaths)))
            living = [r for r in self.replicas if r.alive]
            if not living:
                continue
            victim = rng.choice(living)
            victim.kill()
            asyncio.get_running_loop().call_later(rng.uniform(1.0, 20.0), self._restart, victim)

    def _restart(self, replica: Replica) -> None:
        if not replica.alive and not self.stopping:
            replica.start()

    # --- the run ----------------------------------------------------------------------
    async def main(self) -> None:
        self.stopping = False
        self.replicas = [Replica(self, i) for i in range(self.config.replicas)]
        for replica in self.replicas:
            replica.start()
        busy = self.config.actions * self.config.action_gap
        await asyncio.gather(self.produce(), self.kill_some(busy))
        self.log("producers done")
        await asyncio.sleep(self.config.quiet_seconds)
        self.stopping = True
        for replica in self.replicas:
            if not replica.alive:
                replica.start()
        await asyncio.sleep(self.config.lease_seconds * 4)  # dead leases run out, are swept
        self.s3.reliable.update(r.client.client.actor for r in self.replicas if r.client is not None)
        for replica in self.replicas:
            await replica.stop()
        self.log("fleet drained")
        self.check_end()

    def check_end(self) -> None:
        names, objects = self.names, self.s3.objects
        for key in self.keys:
            current = objects.get(key)
            result = objects.get(names.result_json(key))
            error = objects.get(names.error_json(key))
            answered = {n: o.metadata.get(SOURCE_ETAG_META) for n, o in
                        (("result", result), ("error record", error)) if o is not None}
            if current is not None:
                # Invariant 1, keep (and failed sources, which stay under move/delete).
                mine = [n for n, etag in answered.items() if etag == current.etag]
                if len(mine) != 1:
                    self.violation(f"{key} {current.etag[:8]} ends with {answered or 'nothing'}")
                elif mine == ["result"] and self.config.action is not SourceAction.KEEP:
                    self.violation(f"{key} has its result but was never {self.config.action.value}d")
                if result is not None and mine == ["result"]:
                    markdown = objects.get(names.result_markdown(key))
                    if markdown is None or markdown.metadata.get(SOURCE_ETAG_META) != current.etag:
                        self.violation(f"{key}: Markdown and JSON name different versions")
            elif (self.uploads[key] and self.deleted_at.get(key, -1) < self.uploads[key][-1].at
                  and not any(key in race for race in self.fallback_races)):
                # Settled by us (move/delete): its last version must have had its result.
                last = self.uploads[key][-1].etag
                if answered.get("result") != last:
                    self.violation(f"{key} was settled but its result names {answered or 'nothing'}, "
                                   f"not {last[:8]}")
                if self.config.action is SourceAction.MOVE:
                    moved = objects.get(names.done(key))
                    if moved is None or moved.etag != last:
                        self.violation(f"{key}'s last version {last[:8]} is not under the done prefix")
        for version, runs in self.runs.items():
            # The same bytes uploaded again after other versions is read again (it is the
            # newest version again, and another version's answer replaced its own).
            uploads = sum(1 for u in self.uploads[version[0]] if u.etag == version[1])
            allowed = uploads + self.deaths[version] + self.retried[version]
            if runs > allowed:
                self.violation(f"{version} read {runs} times, at most {allowed} allowed")
        # No claim held, and no lease of a source kept; the fleet's lister leaves a released
        # record where the store ignores conditional deletes (it is reused by the next).
        left = [k for k, o in objects.items() if k.endswith(".lease") and (
            k.startswith(names.source_leases_prefix) or not json.loads(o.body).get("released"))]
        if left:
            self.violation(f"leases left after quiet: {left}")


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """The watcher's logs dropped for the run (the trace says what happened)."""
    before = structlog.get_config()

    def drop(_logger: Any, _name: str, _event: Any) -> Any:
        raise structlog.DropEvent

    structlog.configure(processors=[drop])
    try:
        yield
    finally:
        structlog.configure(**before)


@contextmanager
def _virtual_stamps(clock: VirtualClock) -> Iterator[None]:
    """Results stamped with the virtual time, so that a replay writes the same bytes."""
    import watcher.pipeline.publish as publish
    import watcher.pipeline.result as result

    def now() -> str:
        return datetime.fromtimestamp(clock.wall(), UTC).isoformat(timespec="seconds")

    before = result.now, publish.now
    result.now = publish.now = now
    try:
        yield
    finally:
        result.now, publish.now = before


def run_virtual(main: Callable[[], Coroutine[Any, Any, T]], clock: VirtualClock | None = None) -> T:
    """Run `main()` on a loop of its own whose time is `clock` (unit tests of timing)."""
    loop = VirtualLoop(clock or VirtualClock())
    try:
        with _quiet_logs():
            return loop.run_until_complete(main())
    finally:
        _close(loop)


def run_seed(seed: int, config: SimConfig | None = None) -> Simulation:
    """Run one seed to the end; its violations (empty when it held) are on the result."""
    config = config or SimConfig.drawn(seed)
    sim = Simulation(config)
    random.seed(seed)  # tenacity's jitter
    clock = sim.clock
    loop = VirtualLoop(clock)
    loop.set_exception_handler(lambda _loop, context: None)  # killed replicas' leftovers
    with (tempfile.TemporaryDirectory(prefix="watcher-sim-") as root, _quiet_logs(),
          _virtual_stamps(clock)):
        sim.work_root = root
        try:
            loop.run_until_complete(asyncio.wait_for(sim.main(), timeout=10_000))
        except (Stalled, TimeoutError) as exc:
            sim.violation(f"the run did not finish: {type(exc).__name__}: {exc}")
        finally:
            _close(loop)
    return sim


def _close(loop: VirtualLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel()
    try:
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()


def describe(sim: Simulation, tail: int = 120) -> str:
    c = sim.config
    head = (f"seed {c.seed}: {c.replicas} replicas, {c.keys} keys, {c.actions} actions, "
            f"{c.deaths} deaths, source action {c.action.value}, faults {c.faults}")
    lines = [head, *(f"  violation: {v}" for v in sim.violations), "  trace (last lines):",
             *(f"    {line}" for line in sim.trace[-tail:]),
             f"  replay: python bench/simulate.py --seed {c.seed} --trace"]
    return "\n".join(lines)


