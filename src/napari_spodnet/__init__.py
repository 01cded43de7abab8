"""napari-spodnet: fast SPoD image recovery (FISTA and the learned SPoD-Net) for napari and Python.

>>> from napari_spodnet import SPoDOperator, fista, simulate, recover
"""

__version__ = "0.1.0"

from .core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .core.network import LISTANet, SPoDNet
from .core.physics import SPoDOperator
from .core.recover import ModelCheck, RecoveryCancelled, RecoveryResult, check_against_fista, load_default_model, recover
from .core.simulate import simulate, simulate_time_series
from .core.solvers import DEFAULT_LAMBDA, SolverResult, fista, ista
from .core.training import Trainer, TrainingConfig, TrainingProgress, train_spodnet
from .core.validation import SPoDInputError

__all__ = [
    "CheckpointError", "DEFAULT_LAMBDA", "LISTANet", "ModelCheck", "RecoveryCancelled", "RecoveryResult", "SPoDInputError",
    "SPoDNet", "SPoDOperator", "SolverResult", "Trainer", "TrainingConfig", "TrainingProgress", "__version__",
    "check_against_fista", "fista", "ista", "load_checkpoint", "load_default_model", "recover", "save_checkpoint", "simulate",
    "simulate_time_series", "train_spodnet",
]
