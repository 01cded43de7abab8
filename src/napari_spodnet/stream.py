"""Streamed recovery of long time series: memory flat in the number of frames, nothing lost.

``recover_to_file(OBS, OUT, ...)`` reads the observation a frame batch at a time, recovers
each batch with the same :class:`~napari_spodnet.core.recover.FrameRecoverer` as
:func:`~napari_spodnet.core.recover.recover` and writes the results as they finish:

* ``OUT.zarr`` -> an OME-Zarr (0.4, zarr format 2) store, one chunk per frame, one OME-Zarr
  image group per output (``image`` (T, c, y, x), ``intensity`` and ``orientation`` (T, y, x)),
  so napari opens ``OUT.zarr`` (the first output) or ``OUT.zarr/intensity`` lazily;
* any other name -> BigTIFF files written by tifffile: the first selected output at ``OUT``,
  the others beside it as ``OUT_intensity.tif`` / ``OUT_orientation.tif``. The files are
  pre-allocated (sparse) and each frame is written at its place.

``outputs`` selects what is written (the 18-channel image is 18 times larger than the
intensity or orientation maps). Everything is first written under a *partial* name
(``OUT.partial.zarr``, ``OUT.partial.tif``) with a completion marker per finished frame, so
a crash or Ctrl-C leaves a valid, readable partial output; ``resume=True`` continues it and
skips finished frames. Only a complete result is moved to ``OUT``, so an existing output is
never replaced by a partial one. An output path equal to the input is refused.

With ``scheduler`` (``"tcp://host:port"`` or a ``distributed.Client``) the frames are
recovered on a dask cluster (:mod:`napari_spodnet.cluster`) and written here as they arrive.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import tifffile

from .core.recover import BatchResult, FrameRecoverer, RecoveryCancelled, RecoveryProgress, orientation_map
from .core.validation import DEFAULT_CHANNELS, SPoDInputError

#: What a recovery can write, in the order files are named.
OUTPUTS = ("image", "intensity", "orientation")
#: Root arrays of an OME-Zarr output (T,), one chunk per frame: 1 once frame t is written,
#: and its objective. napari and OME-Zarr readers open the output groups, not these.
MARKERS = "frames_done"
OBJECTIVES = "frame_objective"
METADATA_KEY = "napari_spodnet"


_ALLOCATOR_TUNED = False


def keep_large_blocks() -> bool:
    """Ask glibc's malloc to keep the recovery's 20 MB temporaries instead of returning each one
    to the kernel (and faulting its pages in again on the next allocation).

    Measured: a fresh 18 x 543 x 543 float32 temporary cost 11 ms against 2 ms for reusing a
    buffer, and a SPoD-Net frame took 1.07 s by default, 0.8 s tuned; dask workers, whose nanny
    sets ``MALLOC_TRIM_THRESHOLD_=65536``, took 2.4 s, 0.6-0.8 s tuned. Process-wide, so used only
    by the batch paths (streamed recovery, dask workers), not by :func:`recover` in a GUI.
    Returns whether it applied (glibc only); keeps at most 256 MB of free heap.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(libc.mallopt(m_trim_threshold, 256 * 2**20))
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = ok
    return ok


def parse_outputs(spec) -> tuple[str, ...]:
    """``"intensity,orientation"``, ``"all"`` or a sequence -> a tuple in :data:`OUTPUTS` order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    if [str(i).strip().lower() for i in items] == ["all"]:
        return OUTPUTS
    names = [str(s).strip().lower() for s in items if str(s).strip()]
    bad = [n for n in names if n not in OUTPUTS]
    if bad or not names:
        raise SPoDInputError(f"Unknown output(s) {', '.join(bad) or '(none)'}: choose from {', '.join(OUTPUTS)} "
                             "(e.g. --only intensity,orientation).")
    return tuple(n for n in OUTPUTS if n in names)


# ---------------------------------------------------------------------------- reading


class FrameSource:
    """Frames of an observation, read a batch at a time.

    ``source`` is a TIFF path or an array (c, H, W) / (T, c, H, W). For an uncompressed
    TIFF each :meth:`read` maps the file, copies the asked frames and unmaps it again, so
    no whole-file mapping stays resident however long the series; a compressed TIFF
    cannot be mapped and is read into memory once (convert it to an uncompressed TIFF for
    series larger than memory). ``len(source)`` is T; ``source[i]`` is frame i (c, H, W).
    """

    def __init__(self, source, n_channels: int = DEFAULT_CHANNELS, axis: int | None = None):
        from .io import read_observation

        self.path: Path | None = None
        self.n_channels, self.axis = n_channels, axis
        self._array = None
        if isinstance(source, (str, os.PathLike)):
            self.path = Path(os.fspath(source)).expanduser()
            obs = read_observation(self.path, n_channels=n_channels, axis=axis, memmap=True)
            self.metadata = obs.metadata
            data = obs.data
            if not obs.metadata.get("memmap"):
                self._array = data  # compressed or odd layout: already in memory
            self.single = data.ndim == 3
            self.shape = tuple(int(s) for s in ((1,) + data.shape if self.single else data.shape))
            self.dtype = data.dtype
            del data, obs
        else:
            arr = source
            if np.ndim(arr) not in (3, 4):
                raise SPoDInputError(f"An observation must be (c, H, W) or (T, c, H, W); got shape {np.shape(arr)}.")
            self.single = np.ndim(arr) == 3
            self._array = arr[None] if self.single else arr
            self.shape = tuple(int(s) for s in self._array.shape)
            self.dtype = np.dtype(getattr(arr, "dtype", np.float32))
            self.metadata = {}
        if self._array is not None and self.single and self.path is not None:
            self._array = self._array[None]

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return self.shape[1:]

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Frames ``indices`` as an in-memory array (B, c, H, W) in the file's dtype."""
        idx = [int(i) for i in indices]
        if self._array is not None:
            return np.stack([np.asarray(self._array[i]) for i in idx])
        from .io import read_observation

        data = read_observation(self.path, n_channels=self.n_channels, axis=self.axis, memmap=True).data
        if self.single:
            data = data[None]
        try:
            return np.stack([np.array(data[i]) for i in idx])
        finally:
            del data  # drop the mapping: resident file pages go with it

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read([i])[0]


# ---------------------------------------------------------------------------- paths


def _is_zarr(path: Path) -> bool:
    return path.suffix.lower() == ".zarr"


def output_paths(output, outputs: Sequence[str]) -> dict[str, Path]:
    """Final path of every selected output. OME-Zarr: one store for all; TIFF: the first selected
    output at ``output``, the others as ``<stem>_<name><suffix>`` beside it."""
    out = Path(os.fspath(output)).expanduser()
    if _is_zarr(out):
        return {name: out for name in outputs}
    suffix = out.suffix or ".tif"
    paths = {}
    for i, name in enumerate(outputs):
        paths[name] = out if i == 0 else out.with_name(f"{out.stem}_{name}{suffix}")
    return paths


def partial_path(final: Path) -> Path:
    """``series.zarr`` -> ``series.partial.zarr``; ``rec.tif`` -> ``rec.partial.tif``."""
    suffix = final.suffix or ".tif"
    return final.with_name(f"{final.stem if final.suffix else final.name}.partial{suffix}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _place(partial: Path, final: Path) -> None:
    """Move a complete result into place: atomic for files; for a store, the old one is moved
    aside first and removed only once the new one is in place (never lost, never partial)."""
    if partial.is_dir():
        aside = None
        if final.exists() or final.is_symlink():
            aside = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, aside)
        os.replace(partial, final)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink()
    else:
        if final.is_dir():
            raise SPoDInputError(f"Cannot write {final}: it is a folder.")
        os.replace(partial, final)


# ---------------------------------------------------------------------------- writers


def _output_shape(name: str, n_frames: int, image_shape, single: bool) -> tuple[tuple[int, ...], str]:
    c, h, w = image_shape
    frame = (c, h, w) if name == "image" else (h, w)
    axes = ("CYX" if name == "image" else "YX")
    return (frame if single else (n_frames, *frame)), (axes if single else "T" + axes)


def frame_outputs(image: np.ndarray, outputs) -> dict[str, np.ndarray]:
    """(c, h, w) recovered frame -> the selected outputs (float32)."""
    result = {}
    if "image" in outputs:
        result["image"] = image
    if "intensity" in outputs:
        result["intensity"] = image.sum(axis=0, dtype=np.float32)
    if "orientation" in outputs:
        result["orientation"] = orientation_map(image)
    return result


class _ZarrWriter:
    """OME-Zarr 0.4 store (zarr format 2): ``<name>/0`` per output, chunked one frame per chunk,
    and root arrays ``frames_done`` / ``frame_objective`` (T,) with one chunk per frame."""

    def __init__(self, final: Path, outputs, n_frames, image_shape, single, run: dict, resume: bool):
        import zarr

        self.final, self.partial = final, partial_path(final)
        self.outputs, self.single, self.n_frames = tuple(outputs), single, n_frames
        if self.partial.exists():
            group = zarr.open_group(str(self.partial), mode="r+")
            _check_resume(self.partial, dict(group.attrs).get(METADATA_KEY, {}).get("run", {}), run)
            self.arrays = {name: group[name]["0"] for name in self.outputs}
        else:
            tmp = self.partial.with_name(f".{self.partial.name}.{uuid.uuid4().hex[:8]}")
            group = zarr.open_group(str(tmp), mode="w-", zarr_format=2)
            group.attrs[METADATA_KEY] = {"run": run, "outputs": list(self.outputs), "complete": False}
            for name in self.outputs:
                shape, axes = _output_shape(name, n_frames, image_shape, single)
                sub = group.create_group(name)
                chunks = shape if single else (1, *shape[1:])
                _create_array(sub, "0", shape, chunks)
                sub.attrs["multiscales"] = [{
                    "version": "0.4", "name": name,
                    "axes": [_ome_axis(a) for a in axes.lower()],
                    "datasets": [{"path": "0", "coordinateTransformations": [
                        {"type": "scale", "scale": [1.0] * len(axes)}]}],
                }]
                sub.attrs[METADATA_KEY] = {"kind": name}
            _create_array(group, MARKERS, (n_frames,), (1,), dtype="uint8", fill_value=0)
            _create_array(group, OBJECTIVES, (n_frames,), (1,), dtype="float64", fill_value=float("nan"))
            os.replace(tmp, self.partial)  # the partial store appears complete in its structure
            group = zarr.open_group(str(self.partial), mode="r+")
            self.arrays = {name: group[name]["0"] for name in self.outputs}
        self.group = group

    def done(self) -> dict[int, float]:
        flags = self.group[MARKERS][:]
        objectives = self.group[OBJECTIVES][:]
        return {int(t): float(objectives[t]) for t in np.nonzero(flags == 1)[0]}

    def write(self, t: int, frame: dict[str, np.ndarray], objective: float) -> None:
        for name, arr in frame.items():
            if self.single:
                self.arrays[name][...] = arr
            else:
                self.arrays[name][t] = arr
        # One chunk per frame: markers of different frames never share a file (safe for
        # concurrent writers), and the marker is written after the frame's data.
        self.group[OBJECTIVES][t] = objective
        self.group[MARKERS][t] = 1

    def finish(self, metadata: dict) -> list[Path]:
        attrs = dict(self.group.attrs[METADATA_KEY])
        attrs.update(complete=True, **metadata)
        self.group.attrs[METADATA_KEY] = json.loads(json.dumps(attrs, default=_json_default))
        _place(self.partial, self.final)
        return [self.final]

    def close(self) -> None:
        pass


def _ome_axis(label: str) -> dict:
    kind = {"t": "time", "c": "channel"}.get(label, "space")
    return {"name": label, "type": kind}


def _create_array(group, name, shape, chunks, dtype="float32", fill_value=0.0):
    kwargs = dict(shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value)
    if hasattr(group, "create_array"):  # zarr >= 3
        return group.create_array(name, compressors=None, **kwargs)
    return group.create_dataset(name, compressor=None, **kwargs)  # zarr 2


class _TiffWriter:
    """Pre-allocated BigTIFF files (one per output); frame t is written at its byte offset.
    Finished frames are listed in ``<first partial>.frames`` (one JSON line per frame)."""

    def __init__(self, finals: dict[str, Path], outputs, n_frames, image_shape, single, run: dict, resume: bool):
        self.finals = finals
        self.partials = {name: partial_path(p) for name, p in finals.items()}
        self.outputs, self.single = tuple(outputs), single
        first = self.partials[self.outputs[0]]
        self.log_path = first.with_name(first.name + ".frames")
        self.run = run
        self.handles, self.offsets, self.frame_bytes = {}, {}, {}
        exists = [p for p in self.partials.values() if p.exists()]
        if exists:
            if not self.log_path.exists() or len(exists) != len(self.partials):
                raise SPoDInputError(f"{exists[0]} is left from an earlier run but its frame log is missing or "
                                     "incomplete; delete the partial file(s) to start over.")
            header = json.loads(self.log_path.read_text().splitlines()[0])
            _check_resume(first, header.get("run", {}), run)
        else:
            for name in self.outputs:
                shape, axes = _output_shape(name, n_frames, image_shape, single)
                meta = {"axes": axes, METADATA_KEY: {"run": run, "kind": name, "complete": False}}
                tifffile.imwrite(self.partials[name], shape=shape, dtype="float32", bigtiff=True,
                                 photometric="minisblack", metadata=json.loads(json.dumps(meta, default=_json_default)))
            self.log_path.write_text(json.dumps({"run": run}, default=_json_default) + "\n")
        for name in self.outputs:
            with tifffile.TiffFile(self.partials[name]) as tf:
                series = tf.series[0]
                if series.dataoffset is None:
                    raise SPoDInputError(f"{self.partials[name]} is not a contiguous file written by this program; "
                                         "delete it to start over.")
                self.offsets[name] = int(series.dataoffset)
                frame = series.shape if single else series.shape[1:]
                self.frame_bytes[name] = int(np.prod(frame)) * 4
            self.handles[name] = open(self.partials[name], "r+b")
        self.log = open(self.log_path, "a")

    def done(self) -> dict[int, float]:
        finished = {}
        for line in self.log_path.read_text().splitlines()[1:]:
            try:
                entry = json.loads(line)
                finished[int(entry["t"])] = float(entry.get("objective") if entry.get("objective") is not None
                                                  else np.nan)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
        return finished

    def write(self, t: int, frame: dict[str, np.ndarray], objective: float) -> None:
        for name, arr in frame.items():
            fh = self.handles[name]
            fh.seek(self.offsets[name] + (0 if self.single else t * self.frame_bytes[name]))
            fh.write(memoryview(np.ascontiguousarray(arr, dtype="<f4")).cast("B"))
            fh.flush()
        self.log.write(json.dumps({"t": t, "objective": None if not np.isfinite(objective) else float(objective)})
                       + "\n")
        self.log.flush()

    def finish(self, metadata: dict) -> list[Path]:
        self.close()
        for name in self.outputs:
            meta = {"shape": None, METADATA_KEY: {"run": self.run, "kind": name, "complete": True, **metadata}}
            with tifffile.TiffFile(self.partials[name]) as tf:
                described = json.loads(tf.pages[0].description)
            meta["shape"] = described.get("shape")
            meta["axes"] = described.get("axes")
            tifffile.tiffcomment(self.partials[name], json.dumps(meta, default=_json_default).encode())
        for name in self.outputs:
            _place(self.partials[name], self.finals[name])
        self.log_path.unlink(missing_ok=True)
        return [self.finals[n] for n in self.outputs]

    def close(self) -> None:
        for fh in self.handles.values():
            if not fh.closed:
                fh.close()
        if not self.log.closed:
            self.log.close()


def _check_resume(partial: Path, stored: dict, run: dict) -> None:
    keys = ("token", "frames", "outputs", "image_shape")
    differs = [k for k in keys if stored.get(k) != json.loads(json.dumps(run.get(k), default=_json_default))]
    if differs:
        raise SPoDInputError(f"{partial} was started with other settings ({', '.join(differs)} differ: another "
                             "input, model, lambda or output selection); delete it to start over, or resume "
                             "with the same settings.")


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


# ---------------------------------------------------------------------------- driver


@dataclass
class StreamProgress:
    """Progress of :func:`recover_to_file`: frames finished (including ones skipped because an
    earlier run finished them) of ``total``; rates count this run's frames only."""

    done: int
    total: int
    skipped: int
    seconds: float
    message: str = ""
    #: frames' worth of the batch being recovered (between FISTA iterations / tiles), in [0, batch size)
    within: float = 0.0

    @property
    def fraction(self) -> float:
        return (self.done + self.within) / max(self.total, 1)

    @property
    def frames_per_second(self) -> float:
        computed = self.done - self.skipped
        return computed / self.seconds if self.seconds > 0 and computed > 0 else 0.0

    @property
    def seconds_left(self) -> float | None:
        fps = self.frames_per_second
        return (self.total - self.done) / fps if fps > 0 else None

    def line(self) -> str:
        left = self.seconds_left
        eta = "?" if left is None else _clock(left)
        return (f"{self.done}/{self.total} frames, {self.frames_per_second:.2f} frames/s, "
                f"{eta} left, {_clock(self.seconds)} elapsed")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


StreamCallback = Callable[[StreamProgress], Optional[bool]]


@dataclass
class StreamSummary:
    """What :func:`recover_to_file` did: final paths, frames computed here and skipped (resumed),
    wall seconds, per-frame objective (T,) on normalised data, and the recoverer used."""

    paths: list[Path]
    frames: int
    computed: int
    skipped: int
    seconds: float
    objective: np.ndarray
    method: str
    lam: float
    info: dict = field(default_factory=dict)


def local_batches(engine: FrameRecoverer, source: FrameSource, batches: Iterable[list[int]],
                  on_frame_progress=None) -> Iterator[tuple[list[int], BatchResult]]:
    """Recover frame batches in this process, one after the other."""
    for frames in batches:
        yield frames, engine.recover_frames(source.read(frames), progress=on_frame_progress)


def _cancel_message(stream, done: Callable[[], int], total: int):
    """``stream``'s batches; a cancel raised inside a batch (between FISTA iterations) gets the
    same message as one between frames."""
    iterator = iter(stream)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except RecoveryCancelled:
            raise RecoveryCancelled(f"Recovery cancelled after {done()} of {total} frames (within the next one); "
                                    "the partial output is kept: resume it with --resume.") from None
        yield item


def recover_to_file(observation, output, psf=None, method: str = "spodnet", *, outputs=OUTPUTS,
                    resume: bool = False, scheduler=None, batch_size: int | None = None,
                    n_channels: int = DEFAULT_CHANNELS, axis: int | None = None,
                    progress: StreamCallback | None = None, metadata: dict | None = None,
                    engine: FrameRecoverer | None = None, **recover_kwargs) -> StreamSummary:
    """Recover ``observation`` (TIFF path or array, (c, H, W) or (T, c, H, W)) into ``output``.

    ``output`` ending in ``.zarr``: OME-Zarr; otherwise BigTIFF (see the module docstring).
    ``outputs``: which of ``image`` (T, c, h, w), ``intensity`` (T, h, w) and ``orientation``
    (T, h, w, radians in [0, pi)) to write, a sequence or ``"intensity,orientation"``.
    ``resume``: continue an interrupted run from its partial output (same settings required);
    without it an existing partial output is an error, never silently discarded.
    ``scheduler``: a dask.distributed address or Client to recover the frames on.
    ``progress(StreamProgress)`` after every frame and, in this process, within a frame too
    (after every FISTA iteration and every tile: ``within`` > 0); return True to cancel, which
    stops within one iteration (the partial output keeps the finished frames, resumable). ``recover_kwargs`` are :func:`~napari_spodnet.core.recover.recover`'s
    (model, lam, iterations, tol, restart, tile, overlap, device, normalize, preprocess_data);
    ``engine`` may be given instead, built with :meth:`FrameRecoverer.create`.
    """
    start = time.perf_counter()
    keep_large_blocks()
    outputs = parse_outputs(outputs)
    final_paths = output_paths(output, outputs)
    _refuse_overwriting_input(observation, final_paths)
    worker_device = "auto"
    if scheduler is not None:
        # The workers pick their own device (a GPU where they have one); here only the
        # normalisation is fitted, on the CPU.
        worker_device = str(recover_kwargs.pop("device", None) or "auto")
        recover_kwargs["device"] = "cpu"
    if engine is None:
        engine = FrameRecoverer.create(psf, method=method, n_channels=n_channels, **recover_kwargs)
    source = FrameSource(observation, n_channels=n_channels, axis=axis)
    T = len(source)
    engine.check_frame_shape(source.frame_shape)
    image_shape = engine.image_shape(source.frame_shape[1:])
    engine.fit(source)  # the prepared sample frames are dropped: keeping them costs memory

    run = {"token": engine.token(), "frames": T, "outputs": list(outputs), "image_shape": list(image_shape),
           "input": str(source.path) if source.path else "array", "input_shape": list(source.shape)}
    first = next(iter(final_paths.values()))
    folder = first.parent
    if not folder.is_dir():
        raise SPoDInputError(f"Cannot write {first.name}: folder {folder} does not exist.")
    partials = {partial_path(p) for p in final_paths.values()}
    leftover = [p for p in partials if p.exists()]
    if leftover and not resume:
        raise SPoDInputError(f"{leftover[0]} holds an interrupted run: pass --resume (resume=True) to continue "
                             "it, or delete it to start over.")
    writer_cls = _ZarrWriter if _is_zarr(first) else _TiffWriter
    if writer_cls is _ZarrWriter:
        writer = _ZarrWriter(first, outputs, T, image_shape, source.single, run, resume)
    else:
        writer = _TiffWriter(final_paths, outputs, T, image_shape, source.single, run, resume)
    try:
        finished = writer.done() if leftover else {}
        objectives = np.full(T, np.nan)
        for t, f in finished.items():
            if 0 <= t < T:
                objectives[t] = f
        todo = [t for t in range(T) if t not in finished]
        skipped = T - len(todo)
        bs = max(1, batch_size or engine.default_batch_size)
        batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]
        run_start = time.perf_counter()
        done = skipped

        def report(message=""):
            if progress is not None and progress(StreamProgress(done, T, skipped, time.perf_counter() - run_start,
                                                                message)):
                raise RecoveryCancelled(f"Recovery cancelled after {done} of {T} frames; the partial output "
                                        f"is kept: resume it with --resume.")

        report("resumed" if skipped else "")
        current = {"batch": 0}  # index into batches of the batch being recovered

        def within_batch(update: RecoveryProgress) -> bool:
            """Per FISTA iteration / tile, inside a batch: cancel without waiting for the frames."""
            if progress is None or current["batch"] >= len(batches):
                return False
            frames = batches[current["batch"]]
            where = f"frame {frames[0] + 1}" if len(frames) == 1 else f"frames {frames[0] + 1}-{frames[-1] + 1}"
            what = f"{update.message} iteration {update.iteration}/{engine.iterations}" \
                if update.iteration is not None else (update.message or "tile")
            return bool(progress(StreamProgress(done, T, skipped, time.perf_counter() - run_start,
                                                f"{where}: {what}", within=update.fraction * len(frames))))

        if scheduler is not None:
            from .cluster import cluster_batches

            stream = cluster_batches(scheduler, engine, source, batches, worker_device=worker_device,
                                     outputs=outputs)
        else:
            stream = local_batches(engine, source, batches, on_frame_progress=within_batch)
        fista_iterations = []
        try:
            for frames, batch in _cancel_message(stream, lambda: done, T):
                for k, t in enumerate(frames):
                    frame = batch.outputs[k] if batch.outputs is not None else frame_outputs(batch.image[k], outputs)
                    writer.write(t, frame, float(batch.objective[k]))
                    objectives[t] = batch.objective[k]
                fista_iterations += batch.fista_iterations
                done += len(frames)
                current["batch"] += 1
                report(f"frames {frames[0] + 1}-{frames[-1] + 1}")
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        seconds = time.perf_counter() - start
        final_meta = {"method": engine.method, "lambda": engine.lam, "seconds": round(seconds, 4),
                      "objective": [None if not np.isfinite(v) else float(v) for v in objectives],
                      "translate": list(engine.translate),
                      "normalization": {"offset": engine.normalization.offset, "scale": engine.normalization.scale},
                      **engine.info, "frames": T, "preprocess": engine.do_preprocess, **(metadata or {})}
        if source.single:
            final_meta["objective"] = final_meta["objective"][0]
        paths = writer.finish(final_meta)
    finally:
        writer.close()
    return StreamSummary(paths=paths, frames=T, computed=T - skipped, skipped=skipped, seconds=seconds,
                         objective=objectives, method=engine.method, lam=engine.lam,
                         info={**engine.info, "fista_iterations": fista_iterations or None})


def refuse_overwriting_input(input_path, output, outputs=OUTPUTS) -> None:
    """Raise :class:`SPoDInputError` when writing ``outputs`` to ``output`` (or its partial name)
    would touch the file ``input_path`` (None: nothing to check). For callers that pass
    :func:`recover_to_file` an array read from that file (the napari widget)."""
    if input_path is None or str(input_path) == "":
        return
    _refuse_overwriting_input(input_path, output_paths(output, parse_outputs(outputs)))


def _refuse_overwriting_input(observation, final_paths: dict[str, Path]) -> None:
    if not isinstance(observation, (str, os.PathLike)):
        return
    source = Path(os.fspath(observation)).expanduser()
    for path in set(final_paths.values()):
        for candidate in (path, partial_path(path)):
            if _same_file(source, candidate) or source.resolve().is_relative_to(candidate.resolve()):
                raise SPoDInputError(f"The output {candidate} is the input file; choose another output name "
                                     "(the input is never overwritten).")
