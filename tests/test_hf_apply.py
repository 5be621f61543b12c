"""``fusedce.hf.apply``: Hugging Face causal LMs compute their labelled loss with
``fusedce.linear_cross_entropy``, never holding the logits.

Each supported family is built from a tiny random configuration (no download) with its real
vocabulary size, and compared with an unpatched copy of itself in fp32: the loss (relative
1e-5) and every parameter's gradient (relative 1e-4 of its largest entry), with labels
partly -100 and with ``num_items_in_batch``; without labels, or with gradients disabled
(evaluation), the outputs are identical.
"""

import contextlib
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the optional 'hf' extra")

import fusedce.hf  # noqa: E402

DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def _config(family):
    """A tiny random configuration of ``family`` with its real vocabulary size."""
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=50_257, n_positions=64, n_embd=32,
                                       n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0)
    if family == "llama":  # Llama 3's vocabulary
        return transformers.LlamaConfig(vocab_size=128_256, **DIMS)
    if family == "mistral":
        return transformers.MistralConfig(vocab_size=32_768, **DIMS)
    if family == "qwen2":  # tied embeddings, as the small Qwen2 models
        return transformers.Qwen2Config(vocab_size=151_936, tie_word_embeddings=True, **DIMS)
    if family == "gemma2":  # a cap that matters at random initialisation (Gemma-2's is 30)
        return transformers.Gemma2Config(vocab_size=256_000, head_dim=8,
                                         final_logit_softcapping=0.5, **DIMS)
    if family == "phi3":
        return transformers.Phi3Config(vocab_size=32_064, pad_token_id=0, **DIMS)
    raise AssertionError(family)


FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "gemma2", "phi3"]


def _model(family, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family))
    if family == "gemma2":  # logits of order 1, not 0.01: the cap of 0.5 bites
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(100.0)
    return model.float().eval()  # eval: no dropout, the two runs see the same network


def _batch(vocab, seed=1, batch=2, length=12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    ids[0, -1] = vocab - 1  # the last class is a target too
    labels = ids.clone()
    labels[1, -4:] = -100  # a shorter second text
    labels[0, 2] = -100
    return ids, labels


def _step(model, ids, labels, **kwargs):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got, want, tol=1e-4):
    assert got.keys() == want.keys()
    for name, g in want.items():
        scale = g.abs().max().clamp_min(1e-30)
        err = ((got[name] - g).abs().max() / scale).item()
        assert err <= tol, (name, err)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("items", [False, True], ids=["mean", "num_items_in_batch"])
def test_loss_and_gradients_match_the_model(family, items):
    model = _model(family)
    fused = fusedce.hf.apply(copy.deepcopy(model))
    ids, labels = _batch(model.config.vocab_size)
    kwargs = {}
    if items:  # gradient accumulation: the sum over this many tokens (more than these)
        kwargs["num_items_in_batch"] = torch.tensor(37)
    out, grads = _step(model, ids, labels, **kwargs)
    out_f, grads_f = _step(fused, ids, labels, **kwargs)
    assert out_f.logits is None  # none were made
    assert out_f.loss.dtype == out.loss.dtype == torch.float32
    torch.testing.assert_close(out_f.loss, out.loss, rtol=1e-5, atol=0)
    _assert_grads_close(grads_f, grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_inference_logits_are_the_models(family):
    model = _model(family)
    fused = fusedce.hf.apply(copy.deepcopy(model))
    ids, _ = _batch(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, model(input_ids=ids).logits)
        # logits_to_keep: the last position only, as generate asks
        assert torch.equal(fused(input_ids=ids, logits_to_keep=1).logits,
                           model(input_ids=ids, logits_to_keep=1).logits)
    generated = fused.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, model.generate(ids[:1, :4], max_new_tokens=3,
                                                  do_sample=False))


def test_gemma2_softcap_is_applied_and_restored():
    """The cap enters the loss (a loss without it differs by far more than the tolerance)
    and the config keeps it after a labelled call, also one that raises."""
    model = _model("gemma2")
    fused = fusedce.hf.apply(copy.deepcopy(model))
    ids, labels = _batch(model.config.vocab_size)
    uncapped = copy.deepcopy(model)
    uncapped.config.final_logit_softcapping = None
    want = model(input_ids=ids, labels=labels).loss.detach()
    got = fused(input_ids=ids, labels=labels).loss.detach()  # with gradients: fused
    other = uncapped(input_ids=ids, labels=labels).loss.detach()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert abs(other - want) > 1e-2
    assert fused.config.final_logit_softcapping == 0.5
    with pytest.raises(ValueError, match="to match target batch_size"):
        fused(input_ids=ids, labels=labels[:, :3])  # labels of the wrong length
    assert fused.config.final_logit_softcapping == 0.5


def test_no_logits_sized_tensor_in_training():
    """A labelled forward and backward of GPT-2 over 640 tokens allocate no tensor as large
    as half the (tokens x 50,257) logits (fusedce's chunks hold 128 tokens' logits)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = fusedce.hf.apply(_model("gpt2"))
    model.config.n_positions = 320
    model.transformer.wpe = torch.nn.Embedding(320, 32)
    ids, labels = _batch(model.config.vocab_size, batch=2, length=320)
    largest = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    largest.append(t.untyped_storage().nbytes())
            return out

    with Watch():
        model(input_ids=ids, labels=labels).loss.backward()
    logits_bytes = ids.numel() * model.config.vocab_size * 4
    assert max(largest) < logits_bytes / 2, (max(largest), logits_bytes)


def test_unsupported_family_and_remove():
    cfg = transformers.OPTConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                 ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16,
                                 max_position_embeddings=32)
    with pytest.raises(ValueError, match="OPTForCausalLM.*"
                                         "GPT2LMHeadModel.*LlamaForCausalLM"):
        fusedce.hf.apply(transformers.OPTForCausalLM(cfg))
    model = fusedce.hf.apply(_model("llama"))
    assert fusedce.hf.apply(model) is model  # twice: a no-op
    ids, labels = _batch(model.config.vocab_size)
    assert model(input_ids=ids, labels=labels).logits is None
    fusedce.hf.remove(model)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (*ids.shape, 128_256)


def test_import_fusedce_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, fusedce; print('transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.slow
def test_trainer_runs_with_it(tmp_path):
    """Three steps of ``Trainer.train()`` on a tiny GPT-2 (which passes
    ``num_items_in_batch``) log the same losses with fusedce applied as without."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    gen = torch.Generator().manual_seed(3)
    data = [{"input_ids": ids, "labels": ids.clone()}
            for ids in torch.randint(0, 50_257, (12, 16), generator=gen)]
    losses = []
    for apply in (False, True):
        model = _model("gpt2").train()
        if apply:
            fusedce.hf.apply(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"run{int(apply)}"), per_device_train_batch_size=4,
            max_steps=3, logging_steps=1, learning_rate=1e-3, report_to=[], use_cpu=True,
            save_strategy="no", seed=0, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4,
                               atol=0)


@pytest.mark.slow
def test_example_script():
    """examples/hf_apply.py runs and its two columns of losses agree."""
    import os
    import re
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "examples", "hf_apply.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    pairs = re.findall(r"unpatched ([0-9.]+)\s+fusedce.hf ([0-9.]+)", done.stdout)
    assert len(pairs) == 5
    for a, b in pairs:
        assert abs(float(a) - float(b)) <= 1e-4 * float(a), (a, b)
    assert float(pairs[-1][0]) < float(pairs[0][0])  # it trains


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_model_loss_is_fp32(dtype):
    """A 16-bit model's loss comes out in fp32, as transformers' (which upcasts its logits),
    and close to it: fusedce computes in fp32 from the 16-bit logits of each chunk."""
    model = _model("llama").to(dtype)
    fused = fusedce.hf.apply(copy.deepcopy(model))
    ids, labels = _batch(model.config.vocab_size)
    want = model(input_ids=ids, labels=labels).loss.detach()
    got = fused(input_ids=ids, labels=labels).loss.detach()  # with gradients: fused
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-3, atol=0)


def test_output_layer_with_a_bias():
    """An output layer with a bias (none of the six families has one; a fine-tuned head
    may): the bias enters the loss and gets its gradient."""
    model = _model("llama")
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(torch.randn(head.out_features, generator=torch.Generator()
                                      .manual_seed(5)))
    model.lm_head = biased
    fused = fusedce.hf.apply(copy.deepcopy(model))
    ids, labels = _batch(model.config.vocab_size)
    out, grads = _step(model, ids, labels)
    out_f, grads_f = _step(fused, ids, labels)
    torch.testing.assert_close(out_f.loss, out.loss, rtol=1e-5, atol=0)
    assert "lm_head.bias" in grads_f
    _assert_grads_close(grads_f, grads)


def test_loss_function_outside_a_labelled_forward_is_the_models():
    """``model.loss_function`` called directly (as some trainers do, on logits they hold) is
    transformers' own loss."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = fusedce.hf.apply(_model("llama"))
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, model.config.vocab_size, generator=gen)
    labels = torch.randint(0, model.config.vocab_size, (2, 5), generator=gen)
    got = model.loss_function(logits, labels, model.config.vocab_size)
    assert torch.equal(got, ForCausalLMLoss(logits, labels, model.config.vocab_size))


def test_return_dict_false():
    """A tuple output (``return_dict=False``): the loss first, the logits None."""
    model = _model("llama")
    fused = fusedce.hf.apply(copy.deepcopy(model))
    ids, labels = _batch(model.config.vocab_size)
    want = model(input_ids=ids, labels=labels, return_dict=False)
    got = fused(input_ids=ids, labels=labels, return_dict=False)  # with gradients: fused
    assert isinstance(got, tuple) and len(got) == len(want) and got[1] is None
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)


def _clm_trainer(model, data, out_dir, seen):
    """A ``Trainer`` evaluating as transformers' ``run_clm.py`` example: the predictions
    (argmax of the logits) to ``compute_metrics``, which ``seen`` collects."""
    def preprocess_logits_for_metrics(logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(dim=-1)

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        seen.append(preds)
        labels, preds = labels[:, 1:].reshape(-1), preds[:, :-1].reshape(-1)
        kept = labels != -100
        return {"accuracy": float((preds[kept] == labels[kept]).mean())}

    args = transformers.TrainingArguments(output_dir=str(out_dir), per_device_eval_batch_size=2,
                                          report_to=[], use_cpu=True, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, eval_dataset=data,
                                compute_metrics=compute_metrics,
                                preprocess_logits_for_metrics=preprocess_logits_for_metrics)


def test_evaluate_with_compute_metrics_gets_the_models_logits(tmp_path):
    """With gradients disabled (``Trainer.evaluate``, ``predict``) a labelled call is the
    model's own (its logits and loss: ``compute_metrics`` gets the predictions); with
    gradients enabled it is fused and makes no logits."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    model = _model("gpt2")
    fused = fusedce.hf.apply(copy.deepcopy(model))
    ids, labels = _batch(model.config.vocab_size, batch=4)
    data = [{"input_ids": i, "labels": t} for i, t in zip(ids, labels)]
    results, seen = [], []
    for m in (model, fused):
        results.append(_clm_trainer(m, data, tmp_path / str(len(results)), seen).evaluate())
    assert seen[1].shape == seen[0].shape == ids.shape
    assert (seen[1] == seen[0]).all()
    assert results[1]["eval_accuracy"] == results[0]["eval_accuracy"]
    assert results[1]["eval_loss"] == pytest.approx(results[0]["eval_loss"], rel=1e-6)
    for no_grad in (torch.no_grad, torch.inference_mode):
        with no_grad():
            got, want = fused(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
        assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
    out = fused(input_ids=ids, labels=labels)
    assert out.logits is None and out.loss.requires_grad


def _assert_patched_on_its_own(patched, ref, original, ids, labels):
    """``patched`` makes no logits and has the loss and gradients of the unpatched ``ref``
    (same weights), and the ``original`` it was copied from got no gradient."""
    out, grads = _step(ref, ids, labels)
    out_p, grads_p = _step(patched, ids, labels)
    assert out_p.logits is None
    torch.testing.assert_close(out_p.loss, out.loss, rtol=1e-5, atol=0)
    _assert_grads_close(grads_p, grads)
    assert all(p.grad is None for p in original.parameters())


def test_deepcopy_is_an_independent_patched_model():
    """A deep copy of a patched model is patched on its own weights: its loss and gradients
    are those of an unpatched model with them, and the original's gradients stay None."""
    import inspect

    model = _model("llama")
    fused = fusedce.hf.apply(copy.deepcopy(model))
    twin, ref = copy.deepcopy(fused), copy.deepcopy(model)
    with torch.no_grad():
        for m in (twin, ref):
            m.lm_head.weight.mul_(3.0)
    ids, labels = _batch(model.config.vocab_size)
    _assert_patched_on_its_own(twin, ref, fused, ids, labels)
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids).logits, ref(input_ids=ids).logits)
    # Trainer reads the argument names of the forward
    assert inspect.signature(twin.forward) == inspect.signature(model.forward)
    fusedce.hf.remove(twin)
    assert twin(input_ids=ids, labels=labels).logits is not None
    assert fused(input_ids=ids, labels=labels).logits is None  # still patched


def test_torch_save_and_load_a_patched_model():
    """``torch.save`` of a patched model loads as a patched model of its own."""
    import io

    model = _model("gpt2")
    fused = fusedce.hf.apply(copy.deepcopy(model))
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ids, labels = _batch(model.config.vocab_size)
    _assert_patched_on_its_own(loaded, model, fused, ids, labels)


def test_only_the_supported_classes():
    """The class decides, not ``config.model_type``: GPT-2's double-heads model (model_type
    'gpt2', whose LM loss would be computed on placeholder logits) and a subclass with its
    own forward are refused; a subclass keeping the forward is accepted."""
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=16, n_embd=16, n_layer=1,
                                  n_head=2)
    with pytest.raises(ValueError, match="GPT2DoubleHeadsModel.*GPT2LMHeadModel"):
        fusedce.hf.apply(transformers.GPT2DoubleHeadsModel(cfg))

    class Overridden(transformers.GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    class Kept(transformers.GPT2LMHeadModel):
        pass

    with pytest.raises(ValueError, match="Overridden overrides the forward of GPT2LMHeadModel"):
        fusedce.hf.apply(Overridden(cfg))
    kept = fusedce.hf.apply(Kept(cfg))
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    assert kept(input_ids=ids, labels=ids).logits is None


def test_the_patch_follows_a_new_output_layer(monkeypatch):
    """``resize_token_embeddings`` after ``apply`` (a new output layer): the loss is still
    fusedce's, and the model's own with the new layer; ``remove`` unpatches both layers."""
    model = fusedce.hf.apply(_model("llama"))
    old_head = model.lm_head
    model.resize_token_embeddings(128_300, mean_resizing=False)
    assert model.lm_head is not old_head and model.lm_head.out_features == 128_300
    ref = fusedce.hf.remove(copy.deepcopy(model))
    calls = []
    real = fusedce.hf.linear_cross_entropy
    monkeypatch.setattr(fusedce.hf, "linear_cross_entropy",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    ids, labels = _batch(128_300)
    out, grads = _step(ref, ids, labels)
    out_f, grads_f = _step(model, ids, labels)
    assert calls and out_f.logits is None
    torch.testing.assert_close(out_f.loss, out.loss, rtol=1e-5, atol=0)
    _assert_grads_close(grads_f, grads)
    assert "forward" not in old_head.__dict__
    fusedce.hf.remove(model)
    assert "forward" not in model.lm_head.__dict__ and "forward" not in model.__dict__


def test_output_layer_sharded_as_its_own_fsdp_unit_is_refused(tmp_path):
    """FSDP2 with the output layer its own ``fully_shard`` unit: its weight is resharded
    before the loss would read it, so a labelled forward with gradients raises; sharded
    with the root it is fused and right. One rank of gloo, in this process."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model("llama")
    ids, labels = _batch(model.config.vocab_size)
    want = model(input_ids=ids, labels=labels).loss.detach()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        own_unit, with_root = (fusedce.hf.apply(copy.deepcopy(model)) for _ in range(2))
        for m in (own_unit, with_root):
            for layer in m.model.layers:
                fully_shard(layer, mesh=mesh)
        fully_shard(own_unit.lm_head, mesh=mesh)
        for m in (own_unit, with_root):
            fully_shard(m, mesh=mesh)
        with pytest.raises(NotImplementedError, match="own FSDP unit"):
            own_unit(input_ids=ids, labels=labels)
        with torch.no_grad():  # evaluation: the model's own forward
            got = own_unit(input_ids=ids, labels=labels).loss
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        out = with_root(input_ids=ids, labels=labels)
        assert out.logits is None
        torch.testing.assert_close(out.loss.detach(), want, rtol=1e-5, atol=0)
    finally:
        dist.destroy_process_group()


def test_accelerate_hooks_on_the_output_layer():
    """Accelerate's hooks (``device_map``, ``cpu_offload``) wrap the output layer's forward,
    which the fused loss replaces. Offloaded, its weight is on the meta device outside that
    forward: the loss was log(V) of the meta weight, silently (found in review); now apply,
    or the labelled forward of a model offloaded after apply, refuses it. A placement-only
    hook (the layer's weight on its device): the model's loss and gradients."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = _model("llama")
    ids, labels = _batch(model.config.vocab_size)
    _, want = _step(model, ids, labels)
    want_loss = model(input_ids=ids, labels=labels).loss.detach()

    offloaded = accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu")
    with pytest.raises(NotImplementedError, match="offloaded by Accelerate"):
        fusedce.hf.apply(offloaded)
    later = accelerate.cpu_offload(fusedce.hf.apply(copy.deepcopy(model)),
                                   execution_device="cpu")
    with pytest.raises(NotImplementedError, match="offloaded by Accelerate"):
        later(input_ids=ids, labels=labels)
    with torch.no_grad():  # evaluation: the model's own forward, hooks and all
        torch.testing.assert_close(later(input_ids=ids, labels=labels).loss, want_loss)

    for order in ("hook-then-apply", "apply-then-hook"):
        placed = copy.deepcopy(model)
        if order == "apply-then-hook":
            fusedce.hf.apply(placed)
        add_hook_to_module(placed.get_output_embeddings(),
                           AlignDevicesHook(execution_device="cpu", io_same_device=True))
        if order == "hook-then-apply":
            fusedce.hf.apply(placed)
        out, got = _step(placed, ids, labels)
        assert out.logits is None, order
        torch.testing.assert_close(out.loss.detach(), want_loss, rtol=1e-5, atol=0)
        _assert_grads_close(got, want)


def _smoothed_loss(logits, labels, vocab_size, **kwargs):
    """A user's causal-LM loss (label smoothing): not one fusedce can compute."""
    labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    return torch.nn.functional.cross_entropy(logits.float().view(-1, vocab_size),
                                             labels.reshape(-1), label_smoothing=0.2)


@contextlib.contextmanager
def _no_fusedce_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fusedce")
        yield


@pytest.mark.parametrize("when", ["before", "after"])
def test_custom_loss_function_is_kept_with_a_warning(when):
    """A loss_function set before ``apply`` was dropped for fusedce's; set after it, it was
    called on placeholder zero logits (log V, no gradient). Either way the model now keeps
    its own loss path (its logits, the custom loss) and fusedce warns, once."""
    model = _model("llama")
    fused = copy.deepcopy(model)
    model.loss_function = _smoothed_loss
    ids, labels = _batch(model.config.vocab_size)
    out, grads = _step(model, ids, labels)
    if when == "before":
        fused.loss_function = _smoothed_loss
        with pytest.warns(UserWarning, match="_smoothed_loss.*run unpatched"):
            fusedce.hf.apply(fused)
        with _no_fusedce_warning():
            out_f, grads_f = _step(fused, ids, labels)
    else:
        fusedce.hf.apply(fused)
        fused.loss_function = _smoothed_loss
        with pytest.warns(UserWarning, match="_smoothed_loss.*run unpatched"):
            out_f, grads_f = _step(fused, ids, labels)
    with _no_fusedce_warning():  # once per function
        _step(fused, ids, labels)
    assert out_f.logits is not None
    torch.testing.assert_close(out_f.loss, out.loss, rtol=1e-6, atol=0)
    _assert_grads_close(grads_f, grads)
    fusedce.hf.remove(fused)
    assert fused.loss_function is _smoothed_loss


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_under_the_callers_autocast_is_the_models(family):
    """An fp32 model under autocast(bf16) (Trainer's bf16=True, accelerate): the output
    layer's matmul runs in bf16 as the unpatched model's does (fusedce had turned autocast
    off and made fp32 logits), and the loss and gradients are the unpatched model's."""
    model = _model(family)
    fused = fusedce.hf.apply(copy.deepcopy(model))
    ids, labels = _batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _step(model, ids, labels)
        out_f, grads_f = _step(fused, ids, labels)
    assert out_f.logits is None
    assert out_f.loss.dtype == out.loss.dtype == torch.float32
    # the same bf16 logits, the loss of each in fp32: only the summation order differs
    torch.testing.assert_close(out_f.loss, out.loss, rtol=1e-6, atol=0)
    # the logit gradient is rounded to bf16 (2**-9 relative) for the bf16 products
    _assert_grads_close(grads_f, grads, tol=1e-2)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_float64_model_loss_is_fp32_as_transformers(family):
    """transformers' ForCausalLMLoss upcasts the logits with ``.float()``: a float64 model's
    loss is fp32. fusedce computes it in float64 and returns it in fp32: PyTorch's float64
    loss on the model's own (float64) logits rounded once. transformers' fp32 loss itself
    differs from that by its fp32 log-sum over the vocabulary, whose rounding depends on
    the CPU's vector width (4.5e-6 relative for Gemma-2 on an AVX2-only CPU, within 1e-6
    with AVX-512): it gets an fp32 tolerance."""
    model = _model(family).double()
    fused = fusedce.hf.apply(copy.deepcopy(model))
    ids, labels = _batch(model.config.vocab_size)
    out, grads = _step(model, ids, labels)
    out_f, grads_f = _step(fused, ids, labels)
    assert out_f.loss.dtype == out.loss.dtype == torch.float32
    logits = out.logits.detach()
    assert logits.dtype == torch.float64
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out_f.loss.double(), want, rtol=2e-7, atol=0)
    torch.testing.assert_close(out_f.loss, out.loss, rtol=2e-5, atol=0)
    _assert_grads_close(grads_f, grads)


def test_remove_leaves_what_was_set_after_apply():
    """``remove`` took away a forward wrapper (as accelerate's ``prepare`` installs) and a
    loss_function set after ``apply``; it now takes only fusedce's, and the wrapper, which
    calls the patched forward it wrapped, then runs the model's own forward."""
    model = fusedce.hf.apply(_model("llama"))
    inner = model.forward

    def wrapper(*args, **kwargs):
        return inner(*args, **kwargs)

    model.forward = wrapper
    fusedce.hf.remove(model)
    assert model.__dict__["forward"] is wrapper
    ids, labels = _batch(model.config.vocab_size)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None  # the model's own forward: no head patched again
    assert "forward" not in model.lm_head.__dict__
    own = fusedce.hf.apply(_model("llama"))
    own.loss_function = _smoothed_loss
    fusedce.hf.remove(own)
    assert own.loss_function is _smoothed_loss
    assert "forward" not in own.__dict__
