"""napari-spodnet: fast SPoD image recovery (FISTA and the learned SPoD-Net)."""

__version__ = "0.1.0"

from .core.physics import SPoDOperator
from .core.validation import SPoDInputError

__all__ = ["SPoDOperator", "SPoDInputError", "__version__"]
