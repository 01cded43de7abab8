"""Shared test set-up.

torch's OpenMP pool is extremely slow when other processes compete for the two CPU
cores of CI machines (a pass took 60x longer with 2 threads than with 1); the tests use
small arrays, so one thread is both faster and stable.
"""

import torch

torch.set_num_threads(1)
