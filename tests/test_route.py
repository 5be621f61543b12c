"""The hand-off of small CPU calls to PyTorch's loss (``fusedce/_route.py``): which calls go
there, that they give PyTorch's results, and that everything else keeps fusedce's path.

Which implementation ran is read from the autograd graph: PyTorch's loss leaves its own
nodes (``NllLossBackward0``, ``LogSoftmaxBackward0``, ...), fusedce's its Function's."""

from decimal import Decimal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce import _route


def _ran_fusedce(loss):
    """Whether fusedce's autograd Function is in the graph of ``loss``."""
    todo, seen = [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CrossEntropyFunction" in type(node).__name__:
            return True
        todo.extend(next_node for next_node, _ in node.next_functions)
    return False


def _problem(n, c, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=gen) * 3).to(dtype).requires_grad_()
    return x, torch.randint(0, c, (n,), generator=gen)


def _threshold(grad, dtype):
    return (_route.MIN_LOGITS_GRAD if grad else _route.MIN_LOGITS_NO_GRAD)[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_calls_get_pytorchs_results_bit_for_bit(dtype):
    """Below the threshold the call is PyTorch's: loss and gradient identical, whatever the
    options (weights, smoothing, ignore_index, every reduction)."""
    x, target = _problem(7, 10, dtype)
    target[2] = -100
    weight = torch.rand(10).to(dtype)
    for reduction in ("mean", "sum", "none"):
        kwargs = dict(weight=weight, label_smoothing=0.2, reduction=reduction)
        got = fusedce.cross_entropy(x, target, **kwargs)
        assert not _ran_fusedce(got)
        want = F.cross_entropy(x, target, **kwargs)
        upstream = torch.rand_like(want)
        g_got, = torch.autograd.grad(got, x, upstream)
        g_want, = torch.autograd.grad(want, x, upstream)
        assert torch.equal(got, want) and torch.equal(g_got, g_want)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_small_calls_with_pytorchs_defaults_are_pytorchs_bit_for_bit(dtype, grad):
    """The inline test's shortest hand-off (ignore_index and label_smoothing at PyTorch's
    defaults, left for PyTorch to fill in), for every reduction and input form, an ignored
    target included; and the same values given as other objects (an int 0 smoothing, a 0-d
    tensor) take it too, with the same results."""
    x, target = _problem(7, 10, dtype)
    target[2] = -100
    shapes = [(x, target), (x[0], target[0]),  # (N, C) and (C,)
              (x.detach().reshape(7, 5, 2).transpose(1, 2).contiguous().transpose(1, 2)
               .requires_grad_(grad), torch.randint(0, 5, (7, 2)))]  # (N, C, d)
    for inp, tgt in shapes:
        for reduction in ("mean", "sum", "none"):
            for extra in ({}, dict(label_smoothing=0), dict(ignore_index=torch.tensor(-100))):
                with torch.set_grad_enabled(grad):
                    got = fusedce.cross_entropy(inp, tgt, reduction=reduction, **extra)
                    want = F.cross_entropy(inp, tgt, reduction=reduction)
                assert not grad or not _ran_fusedce(got)
                assert torch.equal(got, want), (inp.shape, reduction, extra)
                if grad:
                    upstream = torch.rand_like(want)
                    g_got, = torch.autograd.grad(got, inp, upstream)
                    g_want, = torch.autograd.grad(want, inp, upstream)
                    assert torch.equal(g_got, g_want)


def test_options_are_keyword_only_with_pythons_errors():
    """fusedce's options are taken as keywords only, as the signature says; an unknown
    keyword or one positional argument too many get Python's TypeError, on the small path
    and on fusedce's own; the options given at their defaults still hand a small call off."""
    x, target = _problem(4, 10)
    for hand_off in (True, False):
        try:
            _route.set_hand_off(hand_off)
            with pytest.raises(TypeError, match="unexpected keyword argument 'inplace'"):
                fusedce.cross_entropy(x, target, inplace=True)
            with pytest.raises(TypeError, match="positional arguments but 9 were given"):
                fusedce.cross_entropy(x, target, None, None, -100, None, "mean", 0.0, "auto")
        finally:
            _route.set_hand_off(True)
    explicit = dict(fusedce.functional.OPTIONS)
    assert not _ran_fusedce(fusedce.cross_entropy(x, target, **explicit))
    assert _ran_fusedce(fusedce.cross_entropy(x, target, **{**explicit, "validate": False}))


def test_patch_options_reach_every_patched_call():
    """patch() passes only the options that differ from the defaults; the usual patched
    call goes straight on to fusedce.cross_entropy, the others keep their options."""
    from fusedce import patching

    x, target = _problem(4, 10)
    with fusedce.patched(backend="auto", validate=None, inplace_backward=False):
        assert patching._state["options"] == {}
        assert not _ran_fusedce(F.cross_entropy(x, target))
    with fusedce.patched(backend="torch"):
        assert _ran_fusedce(F.cross_entropy(x, target))
        assert _ran_fusedce(torch.nn.CrossEntropyLoss()(x, target))
    with fusedce.patched(validate=False):
        bad = target.clone()
        bad[0] = 10
        loss = F.cross_entropy(x, bad, reduction="none")
        assert _ran_fusedce(loss) and loss[0].isnan()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_the_threshold_is_where_fusedce_takes_over(grad, dtype, monkeypatch):
    """One row short of the threshold: PyTorch's; at it: fusedce's (and the same numbers).
    Which ran is read from the calls of PyTorch's loss (without a gradient there is no
    graph to read)."""
    from fusedce import functional

    calls = []
    pytorch_loss = functional._pytorch_loss
    monkeypatch.setattr(functional, "_pytorch_loss",
                        lambda *args: calls.append(args) or pytorch_loss(*args))
    c = 4096
    rows = _threshold(grad, dtype) // c
    for n, own in ((rows - 1, False), (rows, True)):
        x, target = _problem(n, c, dtype)
        calls.clear()
        with torch.set_grad_enabled(grad):
            got = fusedce.cross_entropy(x if grad else x.detach(), target)
        assert (not calls) == own, n
        if grad:
            assert _ran_fusedce(got) == own, n
        ref = F.cross_entropy(x.detach().double(), target)
        atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (0, 2.0 ** -7)  # a bf16 ulp
        torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)


def test_the_thresholds_the_readme_gives():
    """README: "under 8M logits in fp32, 16M in bf16, 10M and 32M under no_grad"."""
    assert _route.MIN_LOGITS_GRAD == {torch.float32: 1 << 23, torch.bfloat16: 1 << 24}
    assert _route.MIN_LOGITS_NO_GRAD == {torch.float32: 10 << 20, torch.bfloat16: 1 << 25}


def test_fusedces_own_path_where_asked_or_needed():
    """The hand-off is for backend="auto" only, plain operands PyTorch takes as they are,
    and never when validate=False asks for NaN where PyTorch would raise."""
    x, target = _problem(4, 10)
    assert not _ran_fusedce(fusedce.cross_entropy(x, target))
    assert _ran_fusedce(fusedce.cross_entropy(x, target, backend="torch"))
    assert _ran_fusedce(fusedce.cross_entropy(x, target.int()))  # int32: PyTorch refuses
    assert _ran_fusedce(fusedce.cross_entropy(x, target, weight=torch.rand(10).double()))
    bad = target.clone()
    bad[0] = 10
    loss = fusedce.cross_entropy(x, bad, validate=False, reduction="none")
    assert _ran_fusedce(loss) and loss[0].isnan() and loss[1:].isfinite().all()
    with pytest.raises(IndexError):  # PyTorch's answer, as fusedce's own with validation
        fusedce.cross_entropy(x, bad)


def test_hand_off_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(_route, "HAND_OFF", False)
    monkeypatch.setattr(_route, "SMALLEST", 0)  # as _route.set_hand_off(False)
    x, target = _problem(4, 10)
    assert _ran_fusedce(fusedce.cross_entropy(x, target))


def test_patched_small_calls_reach_pytorch_without_recursion():
    """Under fusedce.patched(), F.cross_entropy is fusedce's: a small call goes on to
    PyTorch's C++ loss, not back to the patched Python function."""
    x, target = _problem(3, 5)
    with fusedce.patched():
        loss = F.cross_entropy(x, target)
        module_loss = torch.nn.CrossEntropyLoss()(x, target)
    assert not _ran_fusedce(loss) and not _ran_fusedce(module_loss)
    assert torch.equal(loss, torch._C._nn.cross_entropy_loss(x, target, None, 1, -100, 0.0))


def test_bad_arguments_raise_pytorchs_errors_on_the_small_path():
    """A small call raises what PyTorch raises: it is PyTorch's call."""
    x, target = _problem(3, 5)
    # values equal to PyTorch's defaults but of types its parser refuses: the shortest
    # hand-off, which leaves those two arguments out, must not take them
    default_lookalikes = [dict(ignore_index=-100.0), dict(ignore_index=np.float64(-100)),
                          dict(ignore_index=torch.tensor(-100.0)),
                          dict(ignore_index=torch.tensor([-100, 1])),
                          dict(label_smoothing=0j), dict(label_smoothing=Decimal(0)),
                          dict(label_smoothing=torch.tensor([0.0]))]
    for kwargs in [dict(reduction="bogus"), dict(label_smoothing=2.0), dict(ignore_index=1.5),
                   dict(weight=torch.ones(4))] + default_lookalikes:
        try:
            F.cross_entropy(x, target, **kwargs)
        except Exception as error:  # noqa: BLE001 - the same type from fusedce
            with pytest.raises(type(error)):
                fusedce.cross_entropy(x, target, **kwargs)
            with fusedce.patched(), pytest.raises(type(error)):
                F.cross_entropy(x, target, **kwargs)
        else:
            pytest.fail(f"PyTorch accepted {kwargs}")


def test_parameters_and_int_smoothing_are_handed_off_too():
    """Logits that are an nn.Parameter, and an int label_smoothing beside an explicit
    option, take the hand-off as a plain tensor and a float do."""
    x, target = _problem(4, 10)
    param = torch.nn.Parameter(x.detach().clone())
    assert not _ran_fusedce(fusedce.cross_entropy(param, target, label_smoothing=0))
    assert not _ran_fusedce(fusedce.cross_entropy(x, target, label_smoothing=0,
                                                  backend="auto"))
    assert torch.equal(fusedce.cross_entropy(param, target, label_smoothing=0),
                       F.cross_entropy(param, target))


def test_set_hand_off_turns_both_tests_off_and_on():
    """``bench.grid --own`` measures fusedce's own path through ``set_hand_off(False)``."""
    x, target = _problem(4, 10)
    try:
        _route.set_hand_off(False)
        assert _route.SMALLEST == 0
        assert _ran_fusedce(fusedce.cross_entropy(x, target))
        assert _ran_fusedce(fusedce.cross_entropy(x, target.to(torch.uint8)))
    finally:
        _route.set_hand_off(True)
    assert _route.SMALLEST > 0
    assert not _ran_fusedce(fusedce.cross_entropy(x, target))
    assert not _ran_fusedce(fusedce.cross_entropy(x, target.to(torch.uint8)))


def test_bench_grid_writes_the_cells_and_who_served_them(tmp_path, capsys):
    """``python -m bench.grid`` (issue: a benchmark of small calls): the table of ratios on
    stdout and every cell, with the implementation that served fusedce's call, as CSV."""
    from bench import grid

    grid.main(["--modes", "fwdbwd,nograd", "--dtypes", "fp32", "--rows", "2",
               "--classes", "10", "--samples", "1", "--sample-ms", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "fwdbwd, fp32" in out and "nograd, fp32" in out and "| 2 |" in out
    rows = (tmp_path / "grid_cpu.csv").read_text().splitlines()
    assert rows[0].split(",")[:5] == ["mode", "dtype", "rows", "classes", "served_by"]
    assert len(rows) == 3 and all(",pytorch," in row for row in rows[1:])
