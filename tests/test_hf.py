"""A Hugging Face GPT-2 trained inside ``fusedce.patched()``: same loss, gradients and step.

transformers computes the causal-LM loss with ``nn.functional.cross_entropy`` on
``logits.view(-1, vocab)``; inside ``fusedce.patched()`` that call is fusedce's. The model is
small and randomly initialised but has GPT-2's 50,257-token vocabulary. Both runs are fp32 and
differ only by rounding, so they are compared at fp32 tolerances; a spy checks that fusedce
really computed the patched loss (so the test cannot pass by patching nothing).
"""

import copy

import pytest
import torch

import fusedce

transformers = pytest.importorskip("transformers", reason="the optional 'hf' extra")
if not hasattr(fusedce, "patched"):
    pytest.skip("fusedce.patched() is not available", allow_module_level=True)

VOCAB = 50_257
ATOL, RTOL = 1e-6, 1e-5  # fp32 vs fp32, same model: rounding of two summation orders


def _gpt2(seed=0):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def _batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 24), generator=gen)
    ids[:, -1] = VOCAB - 1  # the last class is a target too
    labels = ids.clone()
    mask = torch.ones_like(ids)
    labels[1, -7:] = -100  # a padded, shorter second text: its tail is ignored
    mask[1, -7:] = 0
    return ids, labels, mask


LR, EPS = 1e-3, 1e-8  # AdamW's learning rate and its default eps


def _train_step(model, ids, labels, mask, upstream, **loss_kwargs):
    """One AdamW step; returns (loss, {name: grad}, model after the step)."""
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **loss_kwargs)
    # a random upstream gradient, not 1: the backward's scaling is checked too
    (out.loss * upstream).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return out.loss.detach(), grads, model


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls the patch routes to fusedce."""
    from fusedce import patching

    calls = []
    real = patching.cross_entropy

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(patching, "cross_entropy", counting)
    return calls


@pytest.mark.parametrize(
    "options, loss_kwargs",
    [
        pytest.param({}, {}, id="mean"),
        # Trainer's gradient-accumulation path: reduction="sum", divided by a token count
        pytest.param({}, {"num_items_in_batch": torch.tensor(40)}, id="sum-num-items"),
        # the logits tensor is overwritten by its gradient; HF reads it no more after the loss
        pytest.param({"inplace_backward": True}, {}, id="inplace"),
    ],
)
def test_training_step_same_inside_patched(spy, options, loss_kwargs, own_path):
    model = _gpt2()
    ids, labels, mask = _batch()
    upstream = torch.rand(()) + 0.5
    loss_ref, grads_ref, after_ref = _train_step(model, ids, labels, mask, upstream, **loss_kwargs)
    assert spy == []  # outside the context, PyTorch's own function ran
    with fusedce.patched(**options):
        loss, grads, after = _train_step(model, ids, labels, mask, upstream, **loss_kwargs)
    assert len(spy) == 1, "the HF loss did not go through fusedce"
    assert not fusedce.patching.is_patched()
    torch.testing.assert_close(loss, loss_ref, atol=ATOL, rtol=RTOL)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=ATOL, rtol=RTOL, msg=name)
    for (name, p), p_ref in zip(after.named_parameters(), after_ref.parameters()):
        atol = ATOL + _adam_step_spread(grads[name], grads_ref[name])
        assert ((p - p_ref).abs() <= atol + RTOL * p_ref.abs()).all(), name


def _adam_step_spread(g, g_ref):
    """How far apart AdamW's first steps from the gradients ``g`` and ``g_ref`` can land.

    The first step moves a parameter by ``LR g / (|g| + EPS)`` (the bias-corrected moments
    are ``g`` and ``g**2``), whose slope ``EPS / (|g| + EPS)**2`` is steepest at the
    smallest ``|g|`` between the two (``1 / EPS`` where they straddle 0). A parameter whose
    gradient is 0 but for rounding, such as the attention's key bias (softmax ignores a
    shift of all its scores), thus moves by rounding noise times ``LR / EPS = 1e5``: two
    summation orders of the same fp32 loss give key-bias gradients 1e-11 apart, steps 1e-6
    apart."""
    low = torch.minimum(g.abs(), g_ref.abs())
    low = torch.where(g.sign() * g_ref.sign() < 0, 0.0, low)
    return LR * (g - g_ref).abs() * EPS / (low + EPS) ** 2


def test_loss_is_the_causal_lm_cross_entropy():
    # The reference itself is right: HF's loss is the float64 mean next-token cross-entropy
    # over the targets not ignored, which is what fusedce is asked to reproduce above.
    model = _gpt2()
    ids, labels, mask = _batch()
    with fusedce.patched():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    logp = out.logits.double().log_softmax(-1)[:, :-1]
    target = labels[:, 1:]
    kept = target != -100
    expected = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)[kept].mean()
    torch.testing.assert_close(out.loss.double(), expected, atol=1e-5, rtol=1e-6)


@pytest.mark.slow
def test_example_script():
    """examples/hf_patched.py runs without a warning, its losses agree, and its gradients
    differ in the last bits: its call (252 x 50,257 logits) is one fusedce's own path
    serves; a call PyTorch's loss served would give a difference of exactly 0."""
    import os
    import re
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "examples", "hf_patched.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and not done.stderr, done.stderr[-2000:]
    ref, ours = map(float, re.search(r"PyTorch ([0-9.]+), fusedce ([0-9.]+)",
                                     done.stdout).groups())
    assert abs(ref - ours) <= 1e-5 * ref
    diff = float(re.search(r"gradient: ([0-9.e+-]+)", done.stdout).group(1))
    assert 0 < diff < 1e-6, done.stdout
