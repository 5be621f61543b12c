"""Which implementation serves a ``cross_entropy`` call: fusedce's own, or PyTorch's.

fusedce's own path wins by fusing passes over logits that do not fit in cache and by
spreading rows over threads; a call whose logits are small gains nothing from either and
pays fusedce's fixed costs (argument handling in Python, an autograd Function, the reduction's
device-side divisor, worker hand-offs), which PyTorch's C++ loss does not. Such calls go to
PyTorch's loss itself: the same results by definition, at PyTorch's speed. The choice is made
here and nowhere else, from the call's size, its mode and the logits' dtype, in well under a
microsecond, before fusedce's front door does any work.

Only with ``backend="auto"`` on CPU tensors (``backend="torch"`` or ``"triton"`` always runs
fusedce's implementations: the tests compare those with PyTorch), plain tensors, operands
PyTorch takes as they are (int64 class indices, uint8 ones with (C,) or (N, C) logits:
its spatial loss refuses them, fusedce takes them; or probabilities of the input's
dtype; class weights of the input's dtype that need no
gradient), arguments fusedce would not refuse where PyTorch accepts them (a negative
``label_smoothing``), and ``validate`` not False (PyTorch's CPU loss always raises for an
out-of-range class index, where ``validate=False`` asks for NaN). A tensor subclass
handed off meets PyTorch's C++ entry point, which offers the call to its
``__torch_function__`` as ``F.cross_entropy`` would.

"""

import torch
from torch.nn import _reduction

# False: every call runs fusedce's own path; change it with ``set_hand_off``
HAND_OFF = True

# Logits (N * C) from which fusedce's own CPU path is faster than PyTorch's, with and
# without a gradient to take, by dtype; below them (and for fewer classes than MIN_CLASSES,
# other layouts, probability targets and other dtypes, none of them measured to win) a call
# goes to PyTorch. Measured with ``python -m bench.grid --own`` on 2 cores, torch 2.13
# (docs/benchmarks.md; re-measured 2026-12-07 after the exp2 pass): with a gradient, fp32
# loses at 8,192 x 1,000 with reduction 'none' (1.06x) and wins at 16,384 x 1,000 and
# 256 x 50,257; bf16 loses at 256 x 50,257 and wins at 16,384 x 1,000; without one, fp32
# loses at 8,192 x 1,000 (where PyTorch's logits still fit the 32 MiB L3) and wins at
# 10,240 x 1,000 and 200 x 50,257 (10.0-10.2M logits), bf16 loses at 16,384 x 1,000 and
# 256 x 50,257 and wins at 32,768 x 1,000.
MIN_LOGITS_GRAD = {torch.float32: 1 << 23, torch.bfloat16: 1 << 24}
MIN_LOGITS_NO_GRAD = {torch.float32: 10 << 20, torch.bfloat16: 1 << 25}
# PyTorch's 2-class loss stays faster at every size measured (1.6M rows); at 4 and 10
# classes fusedce's is faster from 1M rows on
MIN_CLASSES = 4


def _smallest():
    return min(min(MIN_LOGITS_GRAD.values()), min(MIN_LOGITS_NO_GRAD.values()))


# The smallest threshold of all (0 with the hand-off off): below it a call with int64
# targets and no weight is PyTorch's, decided inline in ``fusedce.cross_entropy``
SMALLEST = _smallest()
_NEVER = 1 << 62
_INT64, _UINT8 = torch.int64, torch.uint8
REDUCTION_ENUMS = {"none": 0, "mean": 1, "sum": 2}
_grad_enabled = torch.is_grad_enabled
_pytorch_loss = torch._C._nn.cross_entropy_loss


def pytorch_serves(input, target, weight, label_smoothing):
    """Whether PyTorch's loss serves this ``backend="auto"`` call (see the module's
    docstring). ``fusedce.cross_entropy`` decides the usual small calls inline first (below
    ``SMALLEST`` logits, int64 targets, no weight); this is every other case."""
    try:
        if not (HAND_OFF and input.is_cpu and type(label_smoothing) in (float, int)
                and label_smoothing >= 0.0):
            return False  # fusedce refuses a negative label_smoothing, PyTorch ignores it
        dtype, t_dtype = input.dtype, target.dtype
        if weight is not None and (weight.dtype is not dtype or weight.requires_grad):
            return False
        if t_dtype is not _INT64 and t_dtype is not _UINT8:
            return t_dtype is dtype  # probabilities: PyTorch's at every size, unless promoted
        if t_dtype is _UINT8 and input.dim() > 2:
            return False  # PyTorch's spatial loss takes int64 only; fusedce takes uint8
        if type(input.numel()) is not int and torch.compiler.is_exporting():
            # symbolic sizes: an exported program holds for every size, and a size test
            # would be a guard that export refuses; fusedce's op serves them all
            return False
        if input.requires_grad and _grad_enabled():
            threshold = MIN_LOGITS_GRAD.get(dtype, _NEVER)
        else:
            threshold = MIN_LOGITS_NO_GRAD.get(dtype, _NEVER)
        return (input.numel() < threshold or input.dim() != 2
                or input.shape[1] < MIN_CLASSES)
    except (AttributeError, TypeError):  # not tensors: fusedce's front door raises
        return False


def serves_shape(n_rows, n_cols, dtype=torch.float32, grad=True):
    """Whether PyTorch's loss serves a ``backend="auto"`` call on CPU logits (n_rows, n_cols)
    of ``dtype`` against int64 class indices, no weight nor smoothing, with a gradient or
    without: what the demo and the benchmarks report beside their figures."""
    if n_rows * n_cols < SMALLEST:  # decided inline, as cross_entropy decides it
        return True
    x = torch.zeros((), dtype=dtype).expand(n_rows, n_cols).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        return pytorch_serves(x, torch.zeros(n_rows, dtype=torch.long), None, 0.0)


def set_hand_off(enabled):
    """Turns the hand-off on (the default) or off (every call runs fusedce's own path:
    ``bench.grid --own``, and the tests of that path)."""
    global HAND_OFF, SMALLEST
    HAND_OFF = bool(enabled)
    SMALLEST = _smallest() if HAND_OFF else 0


def reduction_enum(reduction, size_average, reduce):
    """PyTorch's enum for ``reduction`` (legacy ``size_average`` / ``reduce`` first); raises
    PyTorch's error for an unknown one."""
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    enum = REDUCTION_ENUMS.get(reduction) if type(reduction) is str else None
    return _reduction.get_enum(reduction) if enum is None else enum


def pytorch_cross_entropy(input, target, weight, size_average, ignore_index, reduce,
                          reduction, label_smoothing):
    """PyTorch's own ``F.cross_entropy``, minus its Python-level ``__torch_function__``
    dispatch (which would look up a patched ``F.cross_entropy`` and land in fusedce again);
    the C++ entry point still offers the call to a subclass's ``__torch_function__``."""
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    return _pytorch_loss(input, target, weight, reduction_enum(reduction, None, None),
                         ignore_index, label_smoothing)


def plain_scales(logit_scale, lse_square_scale):
    """Whether ``cross_entropy``'s ``logit_scale`` and ``lse_square_scale`` are their
    defaults (plain numbers only: comparing a tensor would sync, or raise)."""
    return (type(logit_scale) in (float, int) and logit_scale == 1
            and type(lse_square_scale) in (float, int) and lse_square_scale == 0)
