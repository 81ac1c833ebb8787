"""torch.compile interop that must not cost anything at import."""


def constant_under_compile(fn):
    """Mark ``fn`` so torch.compile calls it eagerly while tracing and treats its result as
    a constant: what ``torch.compiler.assume_constant_result`` does, without importing
    ``torch._dynamo`` (seconds) at package import. tests/kernels/test_ops.py compiles with
    ``fullgraph=True`` through these functions, so a torch that stops honouring the mark fails
    there, loudly.
    """
    fn._dynamo_marked_constant = True
    return fn
