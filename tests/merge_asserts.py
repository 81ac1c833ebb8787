"""What the sampler tests assert about a finished call's merge, shared by the adapter x method x
scheduler matrices (tests/sampler/test_sampler.py, tests/adapters/test_adapters_image_stableaudio.py)."""
from __future__ import annotations

import torch

from safa_kernels import gather


def keep_last_views(store: list):
    """A step callback keeping in ``store[0]`` a copy of the views after the latest step's merge
    (after the call: the last step's; a scheduler may run more timesteps than asked, e.g. PNDM)."""
    def callback(jd, i, t, kwargs):
        store[:] = [kwargs["views"].clone()]
    return callback


def assert_merged_as_the_method_says(out, views, dim):
    """After the last merge every view is its window of the returned long latent: for swap, the
    overlap cells are the owning view's, bitwise (a skipped or wrong merge leaves the views
    disagreeing on their overlaps); for averaging, the views agree on them up to the rounding
    of the stitch's mean of equal values."""
    seen = gather(out.latent, out.layout, dim)
    assert seen.shape == views.shape
    if out.method.merge_mode == "swap":
        assert torch.equal(seen, views), out.method.name
    else:
        torch.testing.assert_close(seen, views, rtol=1e-5, atol=1e-6)
    assert out.layout.num_views >= 2 and out.layout.overlap > 0  # there were overlaps to merge
