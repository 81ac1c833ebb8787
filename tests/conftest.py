"""Test session setup.

Without a GPU, the Triton backend is tested on CPU tensors by Triton's interpreter,
which reads TRITON_INTERPRET when kernels are defined: set it before anything imports
safa_kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
