"""Test session setup.

One intra-op thread: the tests run tiny models, where a second thread costs more than it
gives (and on a busy 2-core machine, much more). Tests of the parallel kernel paths set
their own thread count.

Without a GPU, the Triton backend is tested on CPU tensors by Triton's interpreter,
which reads TRITON_INTERPRET when kernels are defined: set it before anything imports
safa_kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
