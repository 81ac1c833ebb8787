"""Per-step profile of joint diffusion: the same as ``safa profile`` (see safa/profiling.py).

    python benchmarks/profile_step.py [--model DIR] [--method safa] [--backend auto] [--compare]
"""
import sys

from safa.profiling import main

if __name__ == "__main__":
    sys.exit(main())
