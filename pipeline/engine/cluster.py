"""dask.distributed for the stages that spread their work: a client on a running scheduler, or on a local cluster
started for the run and closed after it. Tasks open the store themselves by path, so no feature array goes through
the scheduler; only row indices and the small results travel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from threadpoolctl import ThreadpoolController, threadpool_limits

from ..errors import UserError, first_line
from .runtime import progress

log = logging.getLogger(__name__)


@contextlib.contextmanager
def dask_client(scheduler: str | None, workers: int | None, processes: bool = True) -> Iterator[Any]:
    """A dask.distributed Client on `scheduler` (an address), or on a LocalCluster of `workers` single-threaded
    workers (processes, or threads of this process) closed on exit; None when neither is given (work stays local).
    The client is not made the default, so dask code elsewhere in the process keeps its own scheduler."""
    if scheduler is None and workers is None:
        yield None
        return
    from dask.distributed import Client, LocalCluster

    if workers is not None:
        # The scheduler's HTTP server starts even without a dashboard: on a free local port, not 8787 (taken by any
        # other cluster here, with a warning).
        with (
            LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=processes, dashboard_address="127.0.0.1:0"
            ) as cluster,
            Client(cluster, set_as_default=False) as client,
        ):
            log.info("dask: local cluster of %d worker %s", workers, "processes" if processes else "threads")
            yield client
        return
    try:
        _answers(scheduler)
        client = Client(scheduler, set_as_default=False)
    except (OSError, ValueError, TypeError, TimeoutError) as err:  # TypeError: a tls:// address, no TLS set up
        raise UserError(f"cannot reach the dask scheduler at {scheduler}: {first_line(err)}") from None
    with client:
        count = len(client.scheduler_info().get("workers", {}))
        if not count:
            log.warning("dask: the scheduler at %s has no workers yet; the tasks wait for one", scheduler)
        log.info("dask: scheduler with %d workers", count)
        yield client


def _answers(address: str) -> None:
    """Raises OSError (or ValueError for a malformed address) unless a dask server answers at `address` within
    distributed.comm.timeouts.connect (30 s; DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT). A Client that fails to
    connect is left half-made, and closing it at exit waits a minute and prints a traceback; this probe does not."""
    from distributed.comm import connect
    from distributed.security import Security

    async def probe() -> None:
        comm = await connect(address, **Security().get_connection_args("client"))  # TLS from dask's config
        await comm.close()

    with ThreadPoolExecutor(max_workers=1) as pool:  # an event loop of its own, whatever runs in this thread
        pool.submit(asyncio.run, probe()).result()


def thread_counts() -> dict[str, int]:
    """This process's thread counts for torch (MKL under it) and numpy's BLAS, which decide the last bits of its
    numbers: MKL and OpenBLAS split their sums by thread, so a Gram matrix or an SVD changes with the count."""
    blas = [lib.num_threads for lib in ThreadpoolController().select(user_api="blas").lib_controllers]
    return {"torch": torch.get_num_threads(), "blas": max(blas, default=1)}


@contextlib.contextmanager
def same_threads(counts: dict[str, int]) -> Iterator[None]:
    """torch and numpy's BLAS on the thread counts `counts` (`thread_counts` of a client) while the block runs, so
    a dask task computes what its client would have, bit for bit (dask workers start with OMP_NUM_THREADS=1). The
    counts are process-wide: changed only where they differ, which threads of the client's own process never do."""
    old = torch.get_num_threads()
    if old != counts["torch"]:
        torch.set_num_threads(counts["torch"])
    try:
        with threadpool_limits(limits=counts["blas"], user_api="blas"):
            yield
    finally:
        if old != counts["torch"]:
            torch.set_num_threads(old)


def scheduler_kind(client: Any, processes: bool = True) -> dict[str, Any]:
    """What ran the work, for a summary: the local threads, kdpipe's own local cluster, or a scheduler the user ran
    (its worker count; never its address, which may name hosts or carry credentials)."""
    if client is None:
        return {"kind": "local"}
    workers = len(client.scheduler_info().get("workers", {}))
    if client.cluster is not None:
        return {"kind": "local-cluster", "workers": workers, "processes": processes}
    return {"kind": "distributed", "workers": workers}


def run_tasks(client: Any, fn: Callable[[Any], Any], items: list[Any], desc: str, unit: str) -> list[Any]:
    """`fn(item)` for each item, in order, under a progress bar: in this process without a client, else one task
    each on the cluster (the bar advances as they finish). A task's exception is raised here, as if run locally."""
    if client is None:
        return [fn(item) for item in progress(items, desc=desc, unit=unit)]
    from dask.distributed import as_completed

    futures = client.map(fn, items, pure=False)
    try:
        with progress(total=len(futures), desc=desc, unit=unit) as bar:
            for future in as_completed(futures, loop=client.loop):  # not the default client: there is none
                future.result()  # the first failure stops the run
                bar.update()
        return [future.result() for future in futures]
    finally:
        client.cancel(futures)
