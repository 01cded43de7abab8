"""Per-frame recovery on a dask.distributed cluster (``pip install napari-spodnet[cluster]``).

    spodnet recover OBS.tif -o OUT.zarr --scheduler tcp://HOST:PORT

or from Python::

    from napari_spodnet.cluster import recover_on_cluster
    recover_on_cluster("obs.tif", "out.zarr", "tcp://HOST:PORT", outputs="intensity,orientation")

This process reads the frames, one batch per task, and submits each batch with the
(pickled) :class:`~napari_spodnet.core.recover.FrameRecoverer` to the scheduler; the workers
recover them, and the results are written here as they arrive (the same writers as
:func:`napari_spodnet.stream.recover_to_file`, so partial outputs, ``--resume`` and atomic
placement behave the same). At most a few batches per worker thread are in flight, so
memory stays flat however long the series. The workers need no access to the input or the
output files. Each task carries its input frames, so a task whose worker dies (before or after
finishing) is simply run again on another worker by the scheduler: nothing is lost, and the
result is the same, since every frame is recovered independently with the normalisation
fitted once, here.

Workers choose their device with ``worker_device`` (default ``"auto"``: a GPU where the
worker has one), so one worker per GPU of a multi-GPU machine uses them all.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Iterator

import numpy as np

from .core.recover import BatchResult, FrameRecoverer
from .core.validation import SPoDInputError

#: Engines already unpickled and moved to this worker's device, by token (one per worker process).
#: Seconds to wait for the scheduler before giving up with a clear error.
CONNECT_TIMEOUT = 30.0
_WORKER_ENGINES: dict[tuple[str, str], FrameRecoverer] = {}


def _distributed():
    try:
        import distributed
    except ImportError as exc:  # pragma: no cover - the cluster extra is installed in the tests
        raise SPoDInputError("--scheduler needs dask.distributed: pip install 'napari-spodnet[cluster]'.") from exc
    return distributed


def connect(scheduler, timeout: float | None = None):
    """``scheduler``: a ``distributed.Client`` (used as is) or an address ``tcp://host:port``.
    Returns ``(client, owned)``; ``owned`` clients are closed by the caller."""
    distributed = _distributed()
    if isinstance(scheduler, distributed.Client):
        return scheduler, False
    if hasattr(scheduler, "scheduler_address"):  # a LocalCluster / jobqueue cluster object
        scheduler = scheduler.scheduler_address
    try:
        return distributed.Client(str(scheduler), timeout=timeout or CONNECT_TIMEOUT, set_as_default=False), True
    except (OSError, TimeoutError) as exc:
        raise SPoDInputError(f"Cannot reach the dask scheduler at {scheduler} ({exc}); start one with "
                             "`dask scheduler` and workers with `dask worker ADDRESS`, or check the address.") from exc


def _recover_batch(engine: FrameRecoverer, frames: np.ndarray, worker_device: str, outputs=None) -> BatchResult:
    """Worker side: recover a batch of raw frames (B, c, H, W); with ``outputs``, derive those
    here and send only them back (the 18-channel image is 18x the size of a map)."""
    import torch

    from .core.devices import resolve_device
    from .stream import keep_large_blocks

    keep_large_blocks()  # the nanny's MALLOC_TRIM_THRESHOLD_=65536 made frames 3x slower

    device = str(resolve_device(None if worker_device == "auto" else worker_device))
    key = (engine.token(), device)
    cached = _WORKER_ENGINES.get(key)
    if cached is None:
        if len(_WORKER_ENGINES) > 4:
            _WORKER_ENGINES.clear()
        cached = _WORKER_ENGINES[key] = engine.to(device)
    with torch.inference_mode():
        result = cached.recover_frames(frames)
    result.fista_histories = []  # per-iteration histories stay on the worker (large, not written)
    if outputs is not None:
        from .stream import frame_outputs

        result.outputs = [frame_outputs(image, outputs) for image in result.image]
        result.image = None
    return result


def _total_threads(client) -> int:
    try:
        return max(1, sum(client.nthreads().values()))
    except Exception:  # pragma: no cover - an old scheduler
        return 1


def cluster_batches(scheduler, engine: FrameRecoverer, source, batches: Iterable[list[int]],
                    worker_device: str = "auto", in_flight_per_thread: int = 2, outputs=None) -> Iterator[tuple[list[int], BatchResult]]:
    """Recover ``batches`` of frame indices of ``source`` (a :class:`~napari_spodnet.stream.FrameSource`)
    on the cluster; yields ``(frames, BatchResult)`` in completion order (with ``outputs``, the
    results carry only those outputs, derived on the workers)."""
    distributed = _distributed()
    client, owned = connect(scheduler)
    pending = list(batches)[::-1]
    running: dict = {}  # future key -> frame indices
    # (the loop is given: without it as_completed looks for a default client, which ours is not)
    completed = distributed.as_completed(loop=client.loop)

    def submit_next() -> None:
        frames = pending.pop()
        data = source.read(frames)
        with warnings.catch_warnings():
            # The frames travel inside the task on purpose: a task that lost its worker can be rerun.
            warnings.filterwarnings("ignore", message=".*[Ll]arge object.*")
            warnings.filterwarnings("ignore", message=".*[Ss]ending large graph.*")
            future = client.submit(_recover_batch, engine, data, worker_device, outputs, pure=False, retries=2)
        running[future.key] = frames
        completed.add(future)

    try:
        limit = in_flight_per_thread * _total_threads(client)
        while pending and len(running) < limit:
            submit_next()
        for future in completed:
            frames = running.pop(future.key)
            result = future.result()
            future.release()
            if pending:
                submit_next()
            yield frames, result
    finally:
        for future in list(completed.futures):
            future.cancel()
        if owned:
            client.close()


def recover_on_cluster(observation, output, scheduler, psf=None, method: str = "spodnet", **kwargs):
    """:func:`napari_spodnet.stream.recover_to_file` with the frames recovered on ``scheduler``
    (an address ``tcp://host:port``, a ``distributed.Client`` or a cluster object)."""
    from .stream import recover_to_file

    return recover_to_file(observation, output, psf=psf, method=method, scheduler=scheduler, **kwargs)
