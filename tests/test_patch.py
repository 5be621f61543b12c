"""fusedce.patch() / unpatch() / patched(): existing code that calls
torch.nn.functional.cross_entropy or builds torch.nn.CrossEntropyLoss runs fusedce, with the
same loss and gradients, and everything is restored afterwards (also after an exception)."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedce
from fusedce import cpu

ORIGINAL_CE = F.cross_entropy
ORIGINAL_FORWARD = nn.CrossEntropyLoss.forward

# fusedce's own implementation, small calls included (see conftest.own_path)
pytestmark = pytest.mark.usefixtures("own_path")

# A "third-party" training library, written the three ways real code reaches the loss:
# a name imported at import time, the module attribute (as Hugging Face's loss code does),
# and the nn.Module.
THIRD_PARTY_SOURCE = '''
import torch
from torch import nn
from torch.nn.functional import cross_entropy


class Model(nn.Module):
    def __init__(self, vocab=29, dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.head = nn.Linear(dim, vocab)
        self.criterion = nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.1)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb[idx]))

def train_step(model, idx, labels):
    model.zero_grad()
    logits = model(idx)
    flat = logits.view(-1, logits.shape[-1])
    loss = (cross_entropy(flat, labels.view(-1))
            + nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum") / 10
            + model.criterion(flat, labels.view(-1)))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]
'''


@pytest.fixture
def third_party():
    module = types.ModuleType("third_party_trainer")
    sys.modules[module.__name__] = module
    exec(compile(THIRD_PARTY_SOURCE, "third_party_trainer.py", "exec"), vars(module))
    yield module
    del sys.modules[module.__name__]


@pytest.fixture
def calls(monkeypatch):
    """How many times fusedce's implementation ran."""
    count = {"n": 0}
    forward = cpu.ce_fwd  # every CPU path with class indices computes through it

    def spy(*args, **kwargs):
        count["n"] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(cpu, "ce_fwd", spy)
    return count


@pytest.fixture(autouse=True)
def always_unpatched():
    yield
    while fusedce.patching._state["depth"]:
        fusedce.unpatch()
    assert F.cross_entropy is ORIGINAL_CE


def batch():
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 29, (3, 6), generator=gen)
    labels = torch.randint(0, 29, (3, 6), generator=gen)
    labels[0, :2] = -100
    return idx, labels


def test_third_party_training_step_same_loss_and_grads(third_party, calls):
    model = third_party.Model()
    idx, labels = batch()
    loss_ref, grads_ref = third_party.train_step(model, idx, labels)
    assert calls["n"] == 0
    with fusedce.patched():
        assert third_party.cross_entropy is not ORIGINAL_CE  # the import-time alias too
        loss, grads = third_party.train_step(model, idx, labels)
    assert calls["n"] == 3  # all three ways of reaching the loss went to fusedce
    torch.testing.assert_close(loss, loss_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)
    assert third_party.cross_entropy is ORIGINAL_CE
    third_party.train_step(model, idx, labels)
    assert calls["n"] == 3  # unpatched again


def test_restored_after_an_exception(third_party):
    with pytest.raises(ZeroDivisionError):
        with fusedce.patched():
            assert fusedce.patching.is_patched()
            raise ZeroDivisionError
    assert F.cross_entropy is ORIGINAL_CE
    assert nn.CrossEntropyLoss.forward is ORIGINAL_FORWARD
    assert third_party.cross_entropy is ORIGINAL_CE
    assert not fusedce.patching.is_patched()


def test_patch_unpatch_nest(calls):
    x, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    fusedce.patch()
    fusedce.patch()
    fusedce.unpatch()
    F.cross_entropy(x, target)
    assert calls["n"] == 1  # still patched: one unpatch per patch
    fusedce.unpatch()
    assert F.cross_entropy is ORIGINAL_CE
    fusedce.unpatch()  # extra unpatch is harmless
    assert F.cross_entropy is ORIGINAL_CE


def test_module_built_before_patching_and_errors_are_pytorchs(calls):
    criterion = nn.CrossEntropyLoss(weight=torch.rand(5) + 0.1)
    x, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    ref = criterion(x, target)
    with fusedce.patched():
        torch.testing.assert_close(criterion(x, target), ref)
        assert calls["n"] == 1
        with pytest.raises(IndexError, match="Target 7 is out of bounds."):
            F.cross_entropy(x, torch.tensor([0, 1, 2, 7]))
        with pytest.warns(UserWarning, match="size_average"):
            torch.testing.assert_close(F.cross_entropy(x, target, size_average=False),
                                       ORIGINAL_CE(x, target, reduction="sum"))


def test_options_reach_the_patched_calls(monkeypatch):
    """patched(backend="triton") routes the CPU tensors to the kernels (interpreter)."""
    import fusedce.kernels as kernels

    used = []
    ce_fwd = kernels.ce_fwd
    monkeypatch.setattr(kernels, "ce_fwd", lambda *a, **k: used.append(1) or ce_fwd(*a, **k))
    x, target = torch.randn(3, 6), torch.tensor([0, 5, 2])
    with fusedce.patched(backend="triton"):
        loss = F.cross_entropy(x, target)
    assert used
    torch.testing.assert_close(loss, ORIGINAL_CE(x, target))


def test_unknown_option_is_named_by_the_function_called():
    """``patched(foo=1)`` named ``patch()`` in its TypeError; it raises at the call, before
    anything is patched."""
    for fn in (fusedce.patched, fusedce.patch):
        with pytest.raises(TypeError, match=rf"^{fn.__name__}\(\) got an unexpected keyword"):
            fn(foo=1)
        assert not fusedce.patching.is_patched()


def test_tensor_subclasses_go_to_pytorch(calls):
    """A __torch_function__ subclass (DTensor-like) is left to PyTorch's implementation."""

    class Logged(torch.Tensor):
        seen = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(3, 4).as_subclass(Logged)
    with fusedce.patched():
        F.cross_entropy(x, torch.tensor([0, 1, 2]))
    assert calls["n"] == 0 and Logged.seen


@pytest.mark.slow
def test_patched_under_torch_compile(third_party):
    """Patched code compiles with fullgraph=True (no graph break) and agrees with eager."""
    model = third_party.Model()
    idx, labels = batch()

    def loss_fn(idx, labels):
        logits = model(idx)
        return F.cross_entropy(logits.view(-1, 29), labels.view(-1))

    torch._dynamo.reset()
    with fusedce.patched():
        eager = loss_fn(idx, labels)
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(idx, labels)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(eager, loss_fn(idx, labels))


def test_module_imported_inside_the_block_is_restored():
    """A module imported inside the block binds fusedce's function to ``cross_entropy``;
    leaving the block rebinds it to PyTorch's, as for the modules imported before."""
    module = types.ModuleType("imported_inside")
    with fusedce.patched():
        sys.modules[module.__name__] = module
        exec(compile(THIRD_PARTY_SOURCE, "imported_inside.py", "exec"), vars(module))
        assert module.cross_entropy is not ORIGINAL_CE
    try:
        assert module.cross_entropy is ORIGINAL_CE
    finally:
        del sys.modules[module.__name__]


def test_a_model_holding_the_patched_function_pickles():
    """functools.wraps gave the patched function PyTorch's module and name, so pickle took
    it for torch.nn.functional.cross_entropy and refused it ('not the same object'); a
    model that kept it (built inside the block) could not be saved. Saved after the block,
    it loads with fusedce's function, which still computes PyTorch's loss."""
    import io
    import pickle

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 7)
            self.loss_fn = F.cross_entropy

    with fusedce.patched():
        inside = Holder()
    x, t = torch.randn(5, 4), torch.randint(0, 7, (5,))
    loaded = pickle.loads(pickle.dumps(inside.loss_fn))
    torch.testing.assert_close(loaded(inside.head(x), t), ORIGINAL_CE(inside.head(x), t))
    torch.save({"loss_fn": inside.loss_fn, "head": inside.head}, io.BytesIO())
    import inspect

    assert inspect.signature(inside.loss_fn) == inspect.signature(ORIGINAL_CE)
