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
``.compute()`` / ``dask.array.store`` fill the rest, on a dask.distributed client too.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from .core.recover import FrameRecoverer, orientation_map
from .core.validation import DEFAULT_CHANNELS, SPoDInputError

_OUTPUTS = ("image", "intensity", "orientation")


class FrameCache:
    """Thread-safe LRU cache of recovered frames (c, h, w), keyed by ``(token, t)``."""

    def __init__(self, max_frames: int = 16):
        self.max_frames = int(max_frames)
        self._frames: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

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
        with self._lock:
            self._frames[key] = frame
            self._frames.move_to_end(key)
            while len(self._frames) > self.max_frames:
                self._frames.popitem(last=False)

    def invalidate(self, token: str | None = None) -> None:
        """Forget every frame (or only those of one token)."""
        with self._lock:
            for key in [k for k in self._frames if token is None or k[0] == token]:
                del self._frames[key]

    def __len__(self) -> int:
        return len(self._frames)


#: The cache shared by lazy series that are not given their own.
DEFAULT_CACHE = FrameCache()


class LazyRecovery:
    """A recovery of a series whose frames are computed on demand.

    ``image`` (T, c, h, w), ``intensity`` (T, h, w) and ``orientation`` (T, h, w) are dask
    arrays with one chunk per frame (float32). ``frame(t)`` returns the recovered image of
    frame t (cached); ``token`` identifies model/lambda/settings. The observation is read a
    frame at a time (:class:`~napari_spodnet.stream.FrameSource`).
    """

    def __init__(self, observation, psf=None, method: str = "spodnet", *, engine: FrameRecoverer | None = None,
                 cache: FrameCache | None = None, n_channels: int = DEFAULT_CHANNELS, axis: int | None = None,
                 **recover_kwargs):
        import dask.array as da

        from .stream import FrameSource

        self.source = FrameSource(observation, n_channels=n_channels, axis=axis)
        self.engine = engine or FrameRecoverer.create(psf, method=method, n_channels=n_channels, **recover_kwargs)
        self.engine.check_frame_shape(self.source.frame_shape)
        self.engine.fit(self.source)
        self.cache = DEFAULT_CACHE if cache is None else cache
        self.token = self.engine.token()
        self._lock = threading.Lock()
        T = len(self.source)
        c, h, w = self.engine.image_shape(self.source.frame_shape[1:])
        self.shape = (T, c, h, w)

        def array(kind: str, frame_shape):
            name = f"spodnet-{kind}-{self.token[:32]}"
            graph = {(name, t) + (0,) * len(frame_shape): (self._block, kind, t) for t in range(T)}
            chunks = ((1,) * T,) + tuple((n,) for n in frame_shape)
            return da.Array(graph, name, chunks, dtype=np.float32)

        self.image = array("image", (c, h, w))
        self.intensity = array("intensity", (h, w))
        self.orientation = array("orientation", (h, w))

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
        return frame

    def _block(self, kind: str, t: int) -> np.ndarray:
        image = self.frame(t)
        if kind == "image":
            return image[None]
        if kind == "intensity":
            return image.sum(axis=0, dtype=np.float32)[None]
        return orientation_map(image)[None]

    def __getitem__(self, kind: str):
        if kind not in _OUTPUTS:
            raise KeyError(f"{kind!r}: choose from {', '.join(_OUTPUTS)}")
        return getattr(self, kind)

    def invalidate(self) -> None:
        """Drop this series' cached frames (e.g. after changing the model in place)."""
        self.cache.invalidate(self.token)


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
