"""Cohorts on Dask distributed: ``legcomp run COHORT --out DIR --workers N`` (or ``--scheduler ADDRESS``).

One task per study. A task does on a worker what the serial loop does in the driver
(:meth:`legcomp.pipeline.CohortJob.run`: skip a study that is up to date, else read, segment, quantify
and write it atomically into its output folder) and sends back its ``volumes.csv`` as a table, or the
study's one-line failure. Each worker process loads a region's networks once and reuses them
(:func:`cached_cascade`). The driver gathers the results as studies finish (progress bar over studies;
``cohort_volumes.csv`` and ``failures.csv`` rewritten every :data:`CHECKPOINT_S` seconds and at the end,
in the cohort's study order, so that they are the serial run's tables).

A worker process that dies during a study (crashed, killed, over its memory limit) costs only that study:
Dask runs it again on another worker, up to ``distributed.scheduler.allowed-failures`` times (default 3),
then the study is listed in ``failures.csv`` (``KilledWorker: ...``, saying when the worker had gone over
its memory limit) and its half-written temporary folder is removed. A local cluster runs one study at a
time per worker process (one Dask thread) with ``cpus // N`` torch threads, so that a worker's memory
limit (``--memory-per-worker``; default: the machine's memory / N) bounds one study.

Dask is an optional extra: ``pip install "legcomp[cluster]"``; without it cohorts run serially.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from legcomp.errors import LegcompInputError

if TYPE_CHECKING:
    from legcomp.inference.cascade import Cascade

EXTRA = 'pip install "legcomp[cluster]"'
"""How to install the optional Dask extra (named in the error when it is missing)."""

CHECKPOINT_S = 30.0
"""The driver rewrites ``cohort_volumes.csv`` and ``failures.csv`` at most this often while a cohort runs."""

MEMORY_EVENT_WAIT_S = 3.0
"""How long the driver waits for the nanny's over-memory event after a worker died (it may come late)."""

LOCAL_CONFIG = {
    "distributed.scheduler.worker-saturation": 1.0,  # a worker holds only the study it runs (no queued victim)
    "distributed.worker.memory.target": False,  # no spilling: results are small, the memory is the networks'
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,  # a paused worker with torch's memory would never resume
}
"""Dask settings of a local cluster (the nanny still ends a worker over 95 % of its memory limit)."""


def distributed_available() -> bool:
    """True when Dask distributed can be imported."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


def check_cluster_options(workers: int | None, scheduler: str | None, memory_per_worker: str | None) -> None:
    """Raise :class:`LegcompInputError` (one line) for cluster options that cannot work, or without Dask."""
    if workers is not None and scheduler is not None:
        raise LegcompInputError("--workers starts a local cluster, --scheduler uses an existing one: give one")
    if workers is not None and workers < 1:
        raise LegcompInputError(f"--workers must be at least 1, not {workers}")
    if memory_per_worker is not None and workers is None:
        raise LegcompInputError("--memory-per-worker goes with --workers (an existing cluster's workers were "
                                "given their memory limit when they were started)")
    if not distributed_available():
        raise LegcompInputError(f"--workers and --scheduler need Dask distributed, an optional extra: {EXTRA}")
    if memory_per_worker is not None:
        parse_memory(memory_per_worker)


def parse_memory(text: str) -> int:
    """Bytes of a size such as ``4GB``, ``1.5GiB`` or ``800MB`` (:class:`LegcompInputError` otherwise)."""
    from dask.utils import parse_bytes

    try:
        value = parse_bytes(text)
    except (ValueError, TypeError):
        raise LegcompInputError(f"--memory-per-worker {text!r}: expected a size such as 4GB or 1.5GiB") from None
    if value <= 0:
        raise LegcompInputError(f"--memory-per-worker {text!r}: expected a size above zero")
    return int(value)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity: a batch job's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def thread_cap() -> int | None:
    """``OMP_NUM_THREADS`` of the driver's environment (a cap on each process's threads), None when unset."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True)
class ClusterSpec:
    """Where a cohort runs: a local cluster of ``workers`` processes, or the cluster at ``scheduler``."""

    workers: int | None = None
    scheduler: str | None = None
    memory_per_worker: str | None = None

    def torch_threads(self) -> int | None:
        """Torch threads per local worker: ``cpus // workers``, at most ``OMP_NUM_THREADS`` when that is set;
        None for an existing cluster (:func:`threads_by_worker`)."""
        if not self.workers:
            return None
        return min(max(1, available_cpus() // self.workers), thread_cap() or available_cpus())

    def memory_limit(self) -> int:
        """Each local worker's memory limit in bytes: ``memory_per_worker``, else the machine's memory / N."""
        if self.memory_per_worker is not None:
            return parse_memory(self.memory_per_worker)
        from distributed.system import MEMORY_LIMIT

        return int(MEMORY_LIMIT // max(1, self.workers or 1))


@contextmanager
def open_client(spec: ClusterSpec, progress: bool = True) -> Iterator[Any]:
    """A Dask client: of a new local cluster (closed on exit, its workers with it), or of ``spec.scheduler``."""
    import dask
    from distributed import Client, LocalCluster

    if spec.scheduler is not None:
        try:
            client = Client(spec.scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise LegcompInputError(f"cannot reach the Dask scheduler at {spec.scheduler}: {exc}") from None
        with client:
            yield client
        return
    limit = spec.memory_limit()
    with dask.config.set(LOCAL_CONFIG):
        cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True, memory_limit=limit,
                               dashboard_address=None, silence_logs=logging.ERROR)
    if progress:
        from dask.utils import format_bytes
        print(f"legcomp: local Dask cluster: {spec.workers} worker processes, {spec.torch_threads()} torch "
              f"thread(s) and {format_bytes(limit)} each", file=sys.stderr)
    with cluster, Client(cluster) as client:
        yield client


# --------------------------------------------------------------------------- on a worker
_CASCADES: dict[tuple, Any] = {}
"""This process's loaded cascades, by region, weights files (path, size, mtime) and device."""


def cached_cascade(region: str, weights: str | None, device: str) -> Cascade:
    """The region's cascade, loaded once per process and reused (reloaded when its weights files change)."""
    from legcomp.inference.cascade import cascade_paths
    from legcomp.pipeline import load_cascade

    files = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for _, p in sorted(cascade_paths(region, weights)
                                                                                          .items()))
    key = (region, files, device)
    if key not in _CASCADES:
        _CASCADES[key] = load_cascade(region, weights, device)
    return _CASCADES[key]


def threads_by_worker(client: Any) -> dict[str, int]:
    """Torch threads for each worker of an existing cluster: its host's CPUs (as a worker there sees them)
    shared out among the Dask threads of all the workers on that host, at least 1."""
    cpus = client.run(available_cpus)
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]  # all of them (newer Dask lists 5 by default)
    except TypeError:  # older Dask: all of them anyway
        workers = client.scheduler_info()["workers"]
    per_host: dict[str, int] = {}
    for info in workers.values():
        per_host[info["host"]] = per_host.get(info["host"], 0) + int(info["nthreads"])
    return {addr: max(1, cpus.get(addr, 1) // max(1, per_host[info["host"]])) for addr, info in workers.items()}


def _set_torch_threads(threads: int | dict[str, int] | None) -> None:
    """Torch's intra-op threads for this task (per executing thread: set at every task); a dict gives them
    per worker address (a worker that joined later takes 1)."""
    import torch

    if isinstance(threads, dict):
        from distributed import get_worker
        threads = threads.get(get_worker().address, 1)
    torch.set_num_threads(max(1, threads or 1))


def study_task(job, path: str, target: str, name: str, threads: int | dict[str, int] | None) -> dict:
    """One study on a worker: ``{"skipped": bool, "table": volumes or None}``, or ``{"failure": record}``."""
    from legcomp.pipeline import failure_record

    _set_torch_threads(threads)
    try:
        skipped = job.run(Path(path), Path(target), name, lambda reg: cached_cascade(reg, job.weights, job.device))
        return {"skipped": skipped, "table": job.volumes(Path(target))}
    except Exception as exc:  # noqa: BLE001 - one study's failure, reported as in a serial run
        return {"failure": failure_record(Path(path), exc)}


# --------------------------------------------------------------------------- in the driver
def remove_staging(target: Path) -> None:
    """Remove the temporary folders a dead worker left in a study's output folder (and the folder when it
    holds nothing else)."""
    from legcomp.io.atomic import TMP_PREFIX

    if not target.is_dir():
        return
    for tmp in target.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        target.rmdir()  # only when empty
    except OSError:
        pass


def killed_reason(client: Any, exc: Exception) -> str:
    """failures.csv's reason for a study whose workers all died: over the memory limit, or crashed/killed."""
    ws = getattr(exc, "last_worker", None)
    tries = int(getattr(exc, "allowed_failures", 0)) + 1
    address = getattr(ws, "address", None)
    deadline = time.monotonic() + MEMORY_EVENT_WAIT_S
    while address is not None:
        events = [e for _, e in client.get_events("worker-restart-memory")
                  if isinstance(e, dict) and e.get("worker") == address]
        if events:
            from dask.utils import format_bytes
            limit = format_bytes(ws.memory_limit) if getattr(ws, "memory_limit", None) else "?"
            return (f"KilledWorker: the study took its worker over the memory limit ({limit} per worker, "
                    f"--memory-per-worker; {format_bytes(events[-1]['rss'])} used) on each of {tries} tries")
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return (f"KilledWorker: the worker process died while processing this study on each of {tries} tries (crashed "
            "or killed; distributed.scheduler.allowed-failures sets the retries)")


def for_each_study_on_cluster(input: Path, studies: list[Path], out: Path, job,
                              record: Callable[[Path, Path, bool, Any], None], failures: list[dict], *,
                              spec: ClusterSpec, progress: bool = True) -> None:
    """Run ``job`` on every study as one Dask task each. Done studies go to ``record(path, target, skipped,
    table)`` and failed ones to ``failures``, in study order, when all are done or the driver is interrupted
    (then re-raised, the cluster closed first); the cohort tables are checkpointed meanwhile."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    from legcomp.pipeline import _write_cohort_tables, cohort_name, failure_record, report_failure

    names: set[str] = set()
    results: dict[int, dict] = {}
    targets: dict[int, tuple[Path, Path, str]] = {}
    for i, path in enumerate(studies):
        name = cohort_name(input, path)
        if name in names:
            results[i] = {"failure": failure_record(path, LegcompInputError("two studies with the same name", path))}
            report_failure(results[i]["failure"])
            continue
        names.add(name)
        targets[i] = (path, out / name, name)

    def checkpoint() -> None:
        done = [results[i] for i in sorted(results)]
        _write_cohort_tables(out, [r["table"] for r in done if r.get("table") is not None],
                             [r["failure"] for r in done if "failure" in r])

    bar = None
    try:
        with open_client(spec, progress) as client:
            bar = tqdm(total=len(studies), initial=len(results), desc="studies", unit="study", disable=not progress,
                       file=sys.stderr)
            token = uuid.uuid4().hex[:8]
            threads = spec.torch_threads() or threads_by_worker(client)
            where = _absolute if spec.scheduler else str  # another machine's workers start elsewhere
            if spec.scheduler and job.weights:
                job = dataclasses.replace(job, weights=_absolute(job.weights))
            futures = {client.submit(study_task, job, where(path), where(target), name, threads,
                                     key=f"legcomp-study-{i}-{token}", pure=False): i
                       for i, (path, target, name) in targets.items()}
            last = time.monotonic()
            for fut in as_completed(futures):
                i = futures[fut]
                results[i] = _result(client, fut, targets[i][0])
                if "failure" in results[i]:
                    results[i]["failure"]["study"] = str(targets[i][0])  # as given, as in a serial run
                    report_failure(results[i]["failure"])
                bar.update(1)
                if time.monotonic() - last > CHECKPOINT_S:
                    checkpoint()
                    last = time.monotonic()
    finally:
        if bar is not None:
            bar.close()
        for i, (_, target, _) in targets.items():  # what dead workers (or local ones, stopped) left half-written
            if i in results or spec.workers:
                remove_staging(target)
        for i in sorted(results):
            if "failure" in results[i]:
                failures.append(results[i]["failure"])
            else:
                path, target, _ = targets[i]
                record(path, target, results[i]["skipped"], results[i]["table"])


def _absolute(path: str | Path) -> str:
    """``path`` made absolute (not resolved: links stay as given)."""
    return str(Path(path).absolute())


def _result(client: Any, fut: Any, path: Path) -> dict:
    """A finished task's result; a task that Dask failed (its workers died, the cluster went) as a failure."""
    from distributed import KilledWorker

    from legcomp.pipeline import failure_record

    if fut.status == "finished":
        return fut.result()
    exc = fut.exception()
    if isinstance(exc, KilledWorker):
        return {"failure": {"study": str(path), "error": killed_reason(client, exc)}}
    return {"failure": failure_record(path, exc if isinstance(exc, Exception) else RuntimeError(str(exc)))}
