"""What the saved-tensor hooks (``offload.py``, ``compression.py``) and the meter (``measure.py``) ask of a
tensor autograd saves: is it dense in memory, is it a parameter, or a cast/view of one."""

from __future__ import annotations

from torch import Tensor, nn

#: Autograd nodes of ops that only cast, copy or re-view their single input.
COPY_NODES = frozenset(
    f"{name}Backward"
    for name in (
        *("ToCopy", "Clone", "Contiguous", "Alias", "T", "Transpose", "Permute"),
        *("View", "UnsafeView", "Expand", "AsStrided"),
    )
)


def is_dense(t: Tensor) -> bool:
    """True if ``t``'s elements fill a block of memory exactly once, in some dimension order
    (contiguous, channels_last, a transpose, ...): then ``empty_like`` keeps its strides."""
    expected = 1
    for d in sorted(range(t.dim()), key=lambda d: (t.stride(d), t.size(d))):
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def is_parameter(t: Tensor) -> bool:
    """A parameter, a view of one, or another leaf that requires grad."""
    base = t._base if t._base is not None else t
    return isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad)


def copy_chain_leaf(t: Tensor) -> Tensor | None:
    """The leaf that ``t`` is a cast or view of (a chain of :data:`COPY_NODES` ending at the leaf's
    AccumulateGrad, as autocast's weight copies are), else None."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__.rstrip("0123456789") in COPY_NODES:
        nexts = [f for f, _ in fn.next_functions if f is not None]
        if len(nexts) != 1:
            return None
        fn = nexts[0]
        if hasattr(fn, "variable"):  # AccumulateGrad: fn.variable is the leaf
            return fn.variable
    return None
