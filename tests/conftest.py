"""Shared test settings: tiny models run fastest on one thread (and tests then do not fight for cores)."""

import torch

torch.set_num_threads(1)
