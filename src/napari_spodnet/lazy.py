"""Lazy time-series recovery: a dask array whose frames are recovered when they are indexed.

    from napari_spodnet.lazy import lazy_recover
    image = lazy_recover("series.tif")                 # dask.array (T, c, h, w), nothing computed yet
    viewer.add_image(lazy_recover("series.tif", output="intensity"))   # frames recovered as shown

Moving napari's t slider recovers only the frame shown (one network pass, or one FISTA run),
so a layer of a long series appears at once. Recovered frames are kept in a small LRU cache
keyed by ``(token, t)``, where the token (:meth:`FrameRecoverer.token`) covers the model's
weights, the PSF, lambda, the solver settings and the fitted normalisation: a series
built with another model or lambda has another token, hence another dask name and other
cache entries, and never sees stale frames (dask and napari cache by name as well).
The 2-D maps napari shows (intensity, orientation: 1/c of a frame each) go to a second,
larger cache bounded in bytes (``(token, kind, t)``), so :meth:`LazyRecovery.fill`
("Recover all") can keep a whole series' maps and scrubbing is instant afterwards.
``.compute()`` / ``dask.array.store`` fill the rest, on a dask.distributed client too.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

import time
from dataclasses import dataclass
from typing import Callable, Optional

from .core.recover import FrameRecoverer, RecoveryCancelled, orientation_composite, orientation_map
from .core.validation import DEFAULT_CHANNELS, SPoDInputError

_OUTPUTS = ("image", "intensity", "orientation")
#: the maps kept per frame in the map cache (the composite is derived from them when shown)
MAP_KINDS = ("intensity", "orientation")


class FrameCache:
    """Thread-safe LRU cache of arrays keyed by tuples whose first item is a token.

    Holds at most ``max_frames`` entries and, when ``max_bytes`` is given, at most that many
    bytes (the oldest entries go first; one entry larger than the budget is not kept).
    """

    def __init__(self, max_frames: int = 16, max_bytes: int | None = None):
        self.max_frames = int(max_frames)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self._frames: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = 0

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._frames

    def get(self, key):
        with self._lock:
            frame = self._frames.get(key)
            if frame is not None:
                self._frames.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return frame

    def put(self, key, frame) -> None:
        size = int(getattr(frame, "nbytes", 0))
        with self._lock:
            old = self._frames.pop(key, None)
            if old is not None:
                self.nbytes -= int(getattr(old, "nbytes", 0))
            if self.max_bytes is not None and size > self.max_bytes:
                return
            self._frames[key] = frame
            self.nbytes += size
            while len(self._frames) > self.max_frames or (self.max_bytes is not None and self.nbytes > self.max_bytes):
                _, dropped = self._frames.popitem(last=False)
                self.nbytes -= int(getattr(dropped, "nbytes", 0))

    def invalidate(self, token: str | None = None) -> None:
        """Forget every frame (or only those of one token)."""
        with self._lock:
            for key in [k for k in self._frames if token is None or k[0] == token]:
                self.nbytes -= int(getattr(self._frames.pop(key), "nbytes", 0))

    def __len__(self) -> int:
        return len(self._frames)


#: The caches shared by lazy series that are not given their own: recovered frames (c, h, w),
#: and the intensity / orientation maps (h, w) derived from them (a 512 x 512 x 18 frame's two
#: maps are 2.4 MB, so 1 GiB keeps those of ~440 frames).
DEFAULT_CACHE = FrameCache()
DEFAULT_MAP_CACHE = FrameCache(max_frames=100_000, max_bytes=2**30)


@dataclass
class FillProgress:
    """Progress of :meth:`LazyRecovery.fill`: frames in the cache (``done``, of ``total``), of
    which ``computed`` were recovered in this call, after ``seconds``."""

    done: int
    total: int
    computed: int
    seconds: float

    @property
    def fraction(self) -> float:
        return self.done / max(self.total, 1)

    @property
    def frames_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 and self.computed else 0.0

    def line(self) -> str:
        return f"{self.done}/{self.total} frames, {self.frames_per_second:.2f} frames/s"


FillCallback = Callable[[FillProgress], Optional[bool]]


class LazyRecovery:
    """A recovery of a series whose frames are computed on demand.

    ``image`` (T, c, h, w), ``intensity`` (T, h, w) and ``orientation`` (T, h, w) are dask
    arrays with one chunk per frame (float32). ``frame(t)`` returns the recovered image of
    frame t (cached); ``token`` identifies model/lambda/settings. The observation is read a
    frame at a time (:class:`~napari_spodnet.stream.FrameSource`).
    """

    def __init__(self, observation, psf=None, method: str = "spodnet", *, engine: FrameRecoverer | None = None,
                 cache: FrameCache | None = None, map_cache: FrameCache | None = None,
                 n_channels: int = DEFAULT_CHANNELS, axis: int | None = None, **recover_kwargs):
        import dask.array as da

        from .stream import FrameSource

        self.source = FrameSource(observation, n_channels=n_channels, axis=axis)
        self.engine = engine or FrameRecoverer.create(psf, method=method, n_channels=n_channels, **recover_kwargs)
        self.engine.check_frame_shape(self.source.frame_shape)
        self.engine.fit(self.source)
        self.cache = DEFAULT_CACHE if cache is None else cache
        self.map_cache = DEFAULT_MAP_CACHE if map_cache is None else map_cache
        self.token = self.engine.token()
        self._lock = threading.Lock()
        T = len(self.source)
        c, h, w = self.engine.image_shape(self.source.frame_shape[1:])
        self.shape = (T, c, h, w)

        self._dask = da
        self.image = self._array("image", (c, h, w))
        self.intensity = self._array("intensity", (h, w))
        self.orientation = self._array("orientation", (h, w))

    def _array(self, kind: str, frame_shape, *args, name_extra: str = ""):
        T = self.shape[0]
        name = f"spodnet-{kind}-{self.token[:32]}{name_extra}"
        graph = {(name, t) + (0,) * len(frame_shape): (self._block, kind, t, *args) for t in range(T)}
        chunks = ((1,) * T,) + tuple((n,) for n in frame_shape)
        return self._dask.Array(graph, name, chunks, dtype=np.float32)

    def composite(self, top: float):
        """Orientation composite (T, h, w, 3) in [0, 1] (hue = angle, brightness = intensity / ``top``,
        one ``top`` for every frame so brightness compares across time), from the cached maps."""
        top = float(top)
        if not np.isfinite(top) or top <= 0:
            top = 1.0
        return self._array("composite", (*self.shape[-2:], 3), top, name_extra=f"-{top:.6g}")

    def saturation(self, t: int, percentile: float = 99.5) -> float:
        """The intensity percentile of frame ``t`` (computed now if needed): a brightness scale for
        :meth:`composite` (what the eager path uses for the whole series)."""
        top = float(np.percentile(self.frame_map("intensity", t), percentile))
        return top if top > 0 else 1.0

    def frame(self, t: int) -> np.ndarray:
        """Recovered image of frame ``t`` (c, h, w), from the cache or computed now."""
        t = int(t)
        if not 0 <= t < self.shape[0]:
            raise SPoDInputError(f"Frame {t} is outside the series (0 .. {self.shape[0] - 1}).")
        key = (self.token, t)
        frame = self.cache.get(key)
        if frame is None:
            with self._lock:  # napari may ask for the same frame from two threads: compute it once
                frame = self.cache.get(key)
                if frame is None:
                    frame = self.engine.recover_frames(self.source.read([t])).image[0]
                    self.cache.put(key, frame)
                    self._keep_maps(t, frame)
        return frame

    def _keep_maps(self, t: int, image: np.ndarray) -> None:
        self.map_cache.put((self.token, "intensity", t), image.sum(axis=0, dtype=np.float32))
        self.map_cache.put((self.token, "orientation", t), orientation_map(image))

    def frame_map(self, kind: str, t: int) -> np.ndarray:
        """The ``intensity`` or ``orientation`` map (h, w) of frame ``t``, from the map cache or
        derived from the (cached or newly recovered) frame."""
        key = (self.token, kind, int(t))
        value = self.map_cache.get(key)
        if value is None:
            image = self.frame(t)
            value = image.sum(axis=0, dtype=np.float32) if kind == "intensity" else orientation_map(image)
            self.map_cache.put(key, value)
        return value

    def is_filled(self, t: int) -> bool:
        """Whether frame ``t``'s maps are cached (showing them costs no recovery)."""
        return all((self.token, kind, int(t)) in self.map_cache for kind in MAP_KINDS)

    def frames_the_map_cache_holds(self) -> int:
        """How many frames' maps fit in the map cache (all of them when it has no byte budget)."""
        budget = self.map_cache.max_bytes
        per_frame = len(MAP_KINDS) * 4 * self.shape[-2] * self.shape[-1]
        fit = self.map_cache.max_frames // len(MAP_KINDS)
        if budget is not None:
            fit = min(fit, budget // per_frame)
        return int(min(fit, self.shape[0]))

    def fill(self, frames=None, progress: FillCallback | None = None) -> FillProgress:
        """Recover the frames (default: all, as many as the map cache holds) whose maps are not
        cached, in order, and keep their maps: what "Recover all" runs in a worker.

        ``progress(FillProgress)`` after every frame; returning True stops with
        :class:`~napari_spodnet.core.recover.RecoveryCancelled` (the frames done stay cached).
        """
        T = self.shape[0]
        wanted = list(range(min(T, self.frames_the_map_cache_holds()))) if frames is None else \
            [int(t) for t in frames]
        start = time.perf_counter()
        done = computed = 0
        state = FillProgress(0, len(wanted), 0, 0.0)
        for t in wanted:
            if not self.is_filled(t):
                image = self.frame(t)
                self._keep_maps(t, image)  # again: frame() skips it when the frame itself was cached
                computed += 1
            done += 1
            state = FillProgress(done, len(wanted), computed, time.perf_counter() - start)
            if progress is not None and progress(state):
                raise RecoveryCancelled(f"Recover all cancelled after {done} of {len(wanted)} frames.")
        return state

    def _block(self, kind: str, t: int, *args) -> np.ndarray:
        if kind == "image":
            return self.frame(t)[None]
        if kind == "composite":
            (top,) = args
            return orientation_composite(self.frame_map("intensity", t), self.frame_map("orientation", t),
                                         top=top)[None]
        return self.frame_map(kind, t)[None]

    def __getitem__(self, kind: str):
        if kind not in _OUTPUTS:
            raise KeyError(f"{kind!r}: choose from {', '.join(_OUTPUTS)}")
        return getattr(self, kind)

    def invalidate(self) -> None:
        """Drop this series' cached frames and maps (e.g. after changing the model in place)."""
        self.cache.invalidate(self.token)
        self.map_cache.invalidate(self.token)


def lazy_series(observation, psf=None, method: str = "spodnet", **kwargs) -> LazyRecovery:
    """:class:`LazyRecovery` of ``observation`` (path or (T, c, H, W) array); ``kwargs`` are
    :func:`~napari_spodnet.core.recover.recover`'s (model, lam, iterations, tile, device, ...)
    plus ``cache``, ``n_channels`` and ``axis``."""
    return LazyRecovery(observation, psf, method, **kwargs)


def lazy_recover(observation, psf=None, method: str = "spodnet", output: str = "image", **kwargs):
    """A dask array (``image`` (T, c, h, w), ``intensity`` or ``orientation`` (T, h, w)) whose
    frames are recovered when indexed; see :class:`LazyRecovery`."""
    if output not in _OUTPUTS:
        raise SPoDInputError(f"output must be one of {', '.join(_OUTPUTS)}, got {output!r}")
    return lazy_series(observation, psf, method, **kwargs)[output]
