"""One front door: every loss (the functional ones, the modules, the vocab-parallel ones) checks
an argument the same way and raises the exception type PyTorch's F.cross_entropy raises for it,
taken from PyTorch itself. The vocab-parallel losses check before their first collective, so no
process group is needed here."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce import distributed

N, C, H = 3, 5, 4


def _inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen)
    head = torch.randn(C, H, generator=gen)
    return hidden, head, hidden @ head.t(), torch.randint(0, C, (N,), generator=gen)


def _losses():
    """Each loss as ``call(**options)`` on the same small problem."""
    hidden, head, logits, target = _inputs()

    def module(cls, *args):
        def call(**kw):
            backend = kw.pop("backend", "auto")
            return cls(**kw, backend=backend)(*args)
        return call

    return {
        "cross_entropy": lambda **kw: fusedce.cross_entropy(logits, target, **kw),
        "CrossEntropyLoss": module(fusedce.CrossEntropyLoss, logits, target),
        "linear_cross_entropy": lambda **kw: fusedce.linear_cross_entropy(hidden, head, target,
                                                                         **kw),
        "LinearCrossEntropyLoss": module(fusedce.LinearCrossEntropyLoss, hidden, head, target),
        "vocab_parallel_cross_entropy": lambda **kw: distributed.vocab_parallel_cross_entropy(
            logits, target, vocab_start=0, **kw),
        "vocab_parallel_linear_cross_entropy":
            lambda **kw: distributed.vocab_parallel_linear_cross_entropy(
                hidden, head, target, vocab_start=0, **kw),
    }


def _pytorch_raises(**kw):
    _, _, logits, target = _inputs()
    with pytest.raises(Exception) as err:
        F.cross_entropy(logits.double(), target, **kw)
    return type(err.value)


# (the bad option, a word of the message naming it)
BAD = [
    pytest.param({"reduction": "average"}, "reduction", id="reduction"),
    pytest.param({"label_smoothing": 1.5}, "label_smoothing", id="label_smoothing-above-1"),
    pytest.param({"ignore_index": 1.5}, "ignore_index", id="ignore_index-float"),
    pytest.param({"weight": torch.ones(C, 1)}, "weight", id="weight-2d"),
]
# a weight of the wrong length: the vocab-parallel losses learn the class count from their
# collective (tests/test_distributed.py), the others before anything runs
WRONG_LENGTH = pytest.param({"weight": torch.ones(C + 1)}, "weight", id="weight-length")


@pytest.mark.parametrize("bad, word", BAD)
@pytest.mark.parametrize("loss", list(_losses()))
def test_bad_option_raises_pytorchs_exception_type(loss, bad, word, either_route):
    expected = _pytorch_raises(**bad)
    with pytest.raises(expected, match=word):
        _losses()[loss](**bad)


@pytest.mark.parametrize("bad, word", [WRONG_LENGTH])
@pytest.mark.parametrize("loss", [name for name in _losses() if "vocab" not in name])
def test_wrong_weight_length_raises_pytorchs_exception_type(loss, bad, word, either_route):
    expected = _pytorch_raises(**bad)
    with pytest.raises(expected, match=word):
        _losses()[loss](**bad)


@pytest.mark.parametrize("loss", list(_losses()))
def test_fusedce_only_options_fail_the_same_way_everywhere(loss):
    call = _losses()[loss]
    with pytest.raises(ValueError, match="backend"):
        call(backend="cuda")
    # PyTorch accepts a negative smoothing and ignores it; fusedce refuses it in every loss
    with pytest.raises(RuntimeError, match="label_smoothing"):
        call(label_smoothing=-0.1)


@pytest.mark.parametrize("loss", list(_losses()))
def test_class_weight_requiring_grad(loss):
    """A class weight that requires a gradient, with class indices: PyTorch's exception
    type with grad mode on (its nll_loss is not differentiable in the weight); under
    ``no_grad`` PyTorch takes it, and so do fusedce's losses (they raised), with its loss.
    The vocab-parallel ones check before their collective (no process group here: their
    ``no_grad`` result is in tests/test_distributed.py's territory, the same check)."""
    w = torch.rand(C, generator=torch.Generator().manual_seed(2)) + 0.5
    expected = _pytorch_raises(weight=w.double().requires_grad_())
    with pytest.raises(expected, match="not differentiable with respect to 'weight'"):
        _losses()[loss](weight=w.clone().requires_grad_())
    if "vocab" not in loss:
        _, _, logits, target = _inputs()
        with torch.no_grad():
            got = _losses()[loss](weight=w.clone().requires_grad_())
        want = F.cross_entropy(logits.double(), target, weight=w.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


GOOD = {"reduction": "sum", "label_smoothing": 0.25, "ignore_index": 2,
        "weight": torch.rand(C, generator=torch.Generator().manual_seed(1)) + 0.5}


@pytest.mark.parametrize("loss", [name for name in _losses() if "vocab" not in name])
def test_good_options_reach_the_loss(loss, either_route):
    """The same options, valid, give every single-process loss float64 F.cross_entropy."""
    _, _, logits, target = _inputs()
    want = F.cross_entropy(logits.double(), target,
                           **{**GOOD, "weight": GOOD["weight"].double()})
    got = _losses()[loss](**GOOD)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", [name for name in _losses() if "vocab" in name])
def test_good_options_reach_the_collective(loss):
    """Valid options pass the checks: the vocab-parallel losses get as far as asking for a
    process group (their values are checked in test_distributed.py, on 2 and 4 ranks)."""
    with pytest.raises(RuntimeError, match="process group"):
        _losses()[loss](**GOOD)


@pytest.mark.slow
def test_submodules_reachable_from_import_fusedce():
    """README's ``import fusedce`` then ``fusedce.hf.apply(...)``: the submodules the package
    does not import itself (transformers, the distributed losses) load on first use (it
    raised AttributeError, found in review); a misspelt name is still AttributeError."""
    code = ("import sys, fusedce\n"
            "assert 'fusedce.hf' not in sys.modules and 'transformers' not in sys.modules\n"
            "assert callable(fusedce.hf.apply) and callable(fusedce.hf.remove)\n"
            "assert callable(fusedce.distributed.vocab_parallel_cross_entropy)\n"
            "try:\n    fusedce.hff\nexcept AttributeError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "module 'fusedce' has no attribute 'hff'"


@pytest.mark.parametrize("kwargs,error", [
    (dict(inplace_backward="yes"), TypeError), (dict(inplace_backward=1), TypeError),
    (dict(validate="no"), TypeError), (dict(validate=0), TypeError),
    (dict(backend="gpu"), ValueError),
])
def test_run_options_checked_where_given(kwargs, error):
    """A string for a flag (truthy, whatever it says) or an unknown backend raises where it
    is given: the function, the module's constructor and ``patch()`` (which left
    ``F.cross_entropy`` patched to fail at the first loss; found in review)."""
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(error, match=next(iter(kwargs))):
        fusedce.cross_entropy(x, t, **kwargs)
    with pytest.raises(error, match=next(iter(kwargs))):
        fusedce.CrossEntropyLoss(**kwargs)
    original = F.cross_entropy
    with pytest.raises(error, match=next(iter(kwargs))):
        fusedce.patch(**kwargs)
    with pytest.raises(error, match=next(iter(kwargs))):
        with fusedce.patched(**kwargs):
            pass
    assert F.cross_entropy is original
    # the values they take: bools, None for validate
    for ok in (dict(inplace_backward=False), dict(validate=None), dict(validate=True)):
        torch.testing.assert_close(fusedce.cross_entropy(x, t, **ok), F.cross_entropy(x, t))


def test_modules_inside_a_scripted_model():
    """``torch.jit.script`` of a model holding the loss modules, as it scripts one holding
    ``nn.CrossEntropyLoss`` (it raised NotSupportedError on fusedce's ``**options``; found in
    review): the script calls them as Python, with eager mode's loss and gradients."""
    import warnings

    class Model(torch.nn.Module):
        def __init__(self, loss, linear_loss):
            super().__init__()
            self.proj = torch.nn.Linear(4, 3)
            self.head = torch.nn.Parameter(torch.randn(5, 3))
            self.loss, self.linear_loss = loss, linear_loss

        def forward(self, x, t):
            h = self.proj(x)
            # (a script knows no default of an ignored method: linear_bias given)
            return self.loss(h @ self.head.t(), t) + self.linear_loss(h, self.head, t, None)

    model = Model(fusedce.CrossEntropyLoss(label_smoothing=0.1),
                  fusedce.LinearCrossEntropyLoss(reduction="sum"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warning
        scripted = torch.jit.script(model)
    x, t = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    results = []
    for fn in (scripted, model):
        loss = fn(x, t)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
    h = model.proj(x).detach().double()
    ref = (torch.nn.functional.cross_entropy(h @ model.head.detach().double().t(), t,
                                             label_smoothing=0.1)
           + torch.nn.functional.linear_cross_entropy(h, model.head.detach().double(), t,
                                                      reduction="sum"))
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)

