"""Hugging Face causal LMs whose training loss never holds the logits: ``fusedce.hf.apply``.

``apply(model)`` makes an instantiated ``transformers`` causal LM of one of the ``CLASSES``
(``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Gemma2ForCausalLM``, ``Phi3ForCausalLM``, or a subclass that keeps their ``forward``)
compute its loss, when its forward gets ``labels`` with gradients enabled (training), with
:func:`fusedce.linear_cross_entropy` straight from the final hidden states and the output
embedding, one chunk of tokens at a time. Nothing else of the model changes: the same
``forward`` runs (the base model, ``logits_to_keep``, the model's own arguments), except that
while such a forward runs, the output layer hands its input to the loss instead of computing
the (tokens x vocab) logits, and the loss function is fusedce's. What the model's own loss
does is kept:

- the one-token label shift (``labels`` padded with ``-100``, or ``shift_labels`` as given),
  ``ignore_index=-100``;
- ``num_items_in_batch`` (gradient accumulation): the sum of the token losses over it;
- Gemma-2's ``final_logit_softcapping`` (fusedce's ``softcap``);
- the output embedding tied to the input one or not, with its bias where it has one;
- the caller's autocast (``Trainer``'s ``bf16=True``, accelerate's mixed precision): the
  logits are made as the output layer would make them under it, in the autocast dtype,
  and the loss is computed from them in fp32;
- the loss's dtype: fp32, as ``ForCausalLMLoss`` (which upcasts the logits) returns it
  (a float64 model's loss is computed in float64, then returned in fp32).

A model whose ``loss_function`` is not transformers' ``ForCausalLMLoss`` (a custom one
set before ``apply``, or any set after it) keeps it: its labelled forwards run unpatched,
making the logits and calling that function on them, and fusedce warns (once per
function; ``remove(model)`` ends it).

With ``labels`` and gradients enabled the output's ``logits`` is None: none were made.
Without ``labels`` (inference, ``generate``), or with gradients disabled (``torch.no_grad``,
``torch.inference_mode``: ``Trainer.evaluate`` and ``predict``, which hand the logits to
``compute_metrics``), the model's own forward runs unchanged: its logits, its own loss.
``remove(model)`` undoes ``apply``; a ``forward`` or ``loss_function`` set on the model
after ``apply`` (a wrapper of the patched forward, as accelerate's ``prepare`` installs)
is left in place.

What is kept on the model is plain objects in its ``__dict__`` (no closures):
``copy.deepcopy`` of a patched model is an independent patched model (its loss reads its own
weights), and ``torch.save(model)`` / ``pickle`` work (loading it needs ``fusedce``; the
loaded model is patched). The patch follows the output layer: a new one (e.g. made by
``resize_token_embeddings`` after ``apply``, tied or not) is patched at the next labelled
forward with gradients, and the old one is restored.

Not supported:

- using one patched model from several threads while one of them runs a labelled forward
  with gradients (that forward's state is kept on the model and its output layer, and
  Gemma-2's softcap is lifted from its config while it runs); so neither is
  ``torch.nn.DataParallel``, whose replicas share the original's patched forward (which
  reads the original's output layer). Labelled calls without gradients are the model's own
  and may run concurrently, as the unpatched model's may;
- an output layer sharded as its own FSDP unit (FSDP2's ``fully_shard(model.lm_head)``, or
  an FSDP1 wrapper of it): its weight is resharded before the loss would read it, so a
  labelled forward with gradients raises ``NotImplementedError``. Shard the output layer
  with the root module (``fully_shard`` on the blocks, then on the whole model), as
  ``tests/fsdp_hf_train.py`` does.

``import fusedce`` never imports ``transformers``; this module imports it only when used on
a model, and imports nothing of ``torch.distributed`` (it looks in ``sys.modules``).
"""

import inspect
import sys
import warnings

import torch

from .linear import linear_cross_entropy

# The causal-LM classes whose forward the patch understands (all: ``logits =
# lm_head(hidden)``, then ``self.loss_function(logits, labels, vocab_size, **kwargs)``;
# "softcap": in between, Gemma-2's ``cap * tanh(logits / cap)``), by qualified name, so
# that checking a model imports no other model's code.
CLASSES = {
    "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel": "plain",
    "transformers.models.llama.modeling_llama.LlamaForCausalLM": "plain",
    "transformers.models.mistral.modeling_mistral.MistralForCausalLM": "plain",
    "transformers.models.qwen2.modeling_qwen2.Qwen2ForCausalLM": "plain",
    "transformers.models.gemma2.modeling_gemma2.Gemma2ForCausalLM": "softcap",
    "transformers.models.phi3.modeling_phi3.Phi3ForCausalLM": "plain",
}

_STATE = "_fusedce_hf"


def _supported_names():
    return ", ".join(name.rsplit(".", 1)[1] for name in CLASSES)


def _kind(model):
    """'plain' or 'softcap' for a model of a supported class; ValueError otherwise."""
    cls = type(model)
    for base in cls.__mro__:
        kind = CLASSES.get(f"{base.__module__}.{base.__qualname__}")
        if kind is None:
            continue
        if cls.forward is not base.forward:
            raise ValueError(f"fusedce.hf.apply: {cls.__name__} overrides the forward of "
                             f"{base.__name__}, which fusedce.hf does not know; it supports "
                             f"{_supported_names()} and subclasses that keep their forward")
        return kind
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise ValueError(f"fusedce.hf.apply does not support {cls.__name__} (config.model_type "
                     f"{model_type!r}): it supports the causal LMs {_supported_names()} "
                     f"(and subclasses that keep their forward)")


def _own_fsdp_unit(module):
    """Whether ``module`` was passed to FSDP2's ``fully_shard`` or is an FSDP1 wrapper.
    Imports nothing: while ``torch.distributed.fsdp`` is not imported, neither can be."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return False
    kinds = tuple(k for k in (getattr(fsdp, "FSDPModule", None),
                              getattr(fsdp, "FullyShardedDataParallel", None)) if k is not None)
    return bool(kinds) and isinstance(module, kinds)


def _offloaded(module):
    """Whether Accelerate offloads ``module``'s own weights (``cpu_offload``, a
    ``device_map`` with CPU or disk offload): they sit on the meta device except inside the
    module's own forward, which a fused labelled forward never runs. Imports nothing."""
    if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
        return True
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", (hook,)) if hook is not None else ()
    return any(getattr(h, "offload", False) for h in hooks)


class _Capture:
    """Shared by a patched model and its output layer: whether a fused labelled forward is
    running, and the hidden states the output layer got in it. (An output layer copied on
    its own gets its own, never active: the copy computes its logits.)"""

    def __init__(self):
        self.active = False
        self.hidden = None
        self.autocast = None  # the autocast dtype the output layer ran under, or None


class _HeadForward:
    """The patched output layer's ``forward``: its own, except in a fused labelled forward
    of its model, where it keeps its input for the loss and returns placeholder logits."""

    def __init__(self, head, capture, saved):
        self.head, self.capture = head, capture
        self.saved = saved  # an instance attribute ``forward`` it had, or None

    def original(self):
        return self.saved if self.saved is not None else type(self.head).forward.__get__(
            self.head)

    def __call__(self, hidden):
        if not self.capture.active:
            return self.original()(hidden)
        self.capture.hidden = hidden
        # the loss computes the logits under the autocast state the layer's F.linear had
        device = hidden.device.type
        self.capture.autocast = (torch.get_autocast_dtype(device)
                                 if torch.is_autocast_enabled(device) else None)
        # what the model reads as its logits: the right shape, one element of memory
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], self.head.out_features)


class _Applied:
    """What ``apply`` changed on one model (kept on it as ``model._fusedce_hf``), and the
    state of the fused labelled forward running."""

    def __init__(self, model, kind):
        self.model, self.kind = model, kind
        self.capture = _Capture()
        self.softcap = None  # the running forward's final logit softcap (lifted from config)
        self.forward = model.__dict__.get("forward")  # an instance attribute already there
        self.loss_function = model.__dict__.get("_loss_function")
        self.head = None  # the output layer patched, its class then
        self.head_class = None
        self.applied = True  # False once ``remove`` ran (a wrapper may still call us)
        self.warned = None  # the custom loss function last warned about
        # where ``labels`` may come positionally (Trainer passes it by name)
        names = [name for name, p in inspect.signature(self.original_forward()).parameters
                 .items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.labels_at = names.index("labels") if "labels" in names else None

    def original_forward(self):
        model = self.model
        return self.forward if self.forward is not None else type(model).forward.__get__(model)

    def custom_loss(self):
        """What the model's own forward would call as its loss where fusedce cannot compute
        it: a ``loss_function`` set before ``apply`` other than transformers'
        ``ForCausalLMLoss`` (kept by ``apply``), or anything set in place of fusedce's after
        ``apply`` (also deleting it: the forward would call the function on placeholder
        logits). None where the loss is fusedce's."""
        current = self.model.__dict__.get("_loss_function")
        if not (isinstance(current, _LossFunction) and current.state is self):
            return current if current is not None else _default_loss()
        own = _model_loss(self)
        return None if own is _default_loss() else own

    def warn_custom(self, fn):
        """Warns once per function that the labelled forwards run unpatched."""
        if self.warned is fn:
            return
        self.warned = fn
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        warnings.warn(f"fusedce.hf: this {type(self.model).__name__}'s loss_function "
                      f"({name}) is not the one fusedce.hf.apply computes without the logits "
                      f"(transformers' ForCausalLMLoss, set by apply): its labelled forwards "
                      f"run unpatched, making the logits and calling {name} on them. Call "
                      f"fusedce.hf.remove(model) to silence this, or leave loss_function "
                      f"unset for the fused loss", stacklevel=3)

    def follow_head(self):
        """Patches the model's current output layer if it is not the one patched (replaced,
        e.g. by ``resize_token_embeddings``, or its class changed, e.g. by ``fully_shard``);
        refuses one fusedce cannot read the weight of."""
        head = self.model.get_output_embeddings()
        if _offloaded(head):
            raise NotImplementedError(
                f"fusedce.hf: the output layer of this {type(self.model).__name__} is "
                f"offloaded by Accelerate (cpu_offload, or a device_map with CPU or disk "
                f"offload): its weight is loaded only inside its own forward, which the "
                f"fused loss replaces. Keep the output layer on a device (device_map it to "
                f"one), or call fusedce.hf.remove(model)")
        if head is self.head and type(head) is self.head_class:
            return head
        if _own_fsdp_unit(head):
            raise NotImplementedError(
                f"fusedce.hf: the output layer of this {type(self.model).__name__} is sharded "
                f"as its own FSDP unit ({type(head).__name__}): its weight is resharded "
                f"before the loss reads it. Shard it together with the root module (call "
                f"fully_shard on the blocks and then on the whole model, not on the output "
                f"layer), or call fusedce.hf.remove(model)")
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(f"fusedce.hf needs an nn.Linear output embedding, got "
                             f"{type(head).__name__}")
        self.unpatch_head()
        saved = head.__dict__.get("forward")
        if isinstance(saved, _HeadForward):  # a copy of another patched model's layer
            saved = saved.saved
        head.forward = _HeadForward(head, self.capture, saved)
        self.head, self.head_class = head, type(head)
        return head

    def unpatch_head(self):
        head, self.head, self.head_class = self.head, None, None
        patched = None if head is None else head.__dict__.get("forward")
        if isinstance(patched, _HeadForward) and patched.capture is self.capture:
            if patched.saved is None:
                del head.__dict__["forward"]
            else:
                head.__dict__["forward"] = patched.saved


def _labels(state, args, kwargs):
    if "labels" in kwargs:
        return kwargs["labels"]
    at = state.labels_at
    return args[at] if at is not None and len(args) > at else None


class _Forward:
    """The patched model's ``forward``. ``inspect.signature`` of it is the model's own
    (``Trainer`` reads the argument names), through ``__wrapped__``."""

    def __init__(self, state):
        self.state = state

    @property
    def __wrapped__(self):
        return self.state.original_forward()

    def __call__(self, *args, **kwargs):
        state = self.state
        original = state.original_forward()
        if (not state.applied or _labels(state, args, kwargs) is None
                or not torch.is_grad_enabled()):
            return original(*args, **kwargs)
        custom = state.custom_loss()
        if custom is not None:  # the model's own path: its logits, its loss function
            state.warn_custom(custom)
            return original(*args, **kwargs)
        state.follow_head()
        config = state.model.config
        cap = (getattr(config, "final_logit_softcapping", None) if state.kind == "softcap"
               else None)
        capture = state.capture
        capture.active, capture.hidden, state.softcap = True, None, cap
        if cap is not None:
            config.final_logit_softcapping = None  # the loss applies it, per chunk
        try:
            out = original(*args, **kwargs)
        finally:
            capture.active, capture.hidden = False, None
            if cap is not None:
                config.final_logit_softcapping = cap
        if isinstance(out, tuple):  # return_dict=False: (loss, logits, ...), logits None
            return out[:1] + (None,) + out[2:]
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})


class _LossFunction:
    """The patched model's ``loss_function``: fusedce's linear loss in a fused labelled
    forward, the model's own loss otherwise (on logits the caller holds)."""

    def __init__(self, state):
        self.state = state

    def __call__(self, logits, labels, vocab_size=None, num_items_in_batch=None,
                 ignore_index=-100, shift_labels=None, **kwargs):
        state = self.state
        capture = state.capture
        if not capture.active or capture.hidden is None:  # outside a fused labelled forward
            return _model_loss(state)(logits, labels, vocab_size,
                                      num_items_in_batch=num_items_in_batch,
                                      ignore_index=ignore_index, shift_labels=shift_labels,
                                      **kwargs)
        hidden, capture.hidden = capture.hidden, None
        autocast, capture.autocast = capture.autocast, None
        head = state.head
        # where the layer's own forward would run (Accelerate's device_map hook moves its
        # input to the layer's device first)
        hidden = hidden.to(head.weight.device)
        if shift_labels is None:  # tokens < n predict n, as transformers' ForCausalLMLoss
            labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        target = shift_labels.reshape(-1).to(hidden.device)
        reduction = "mean" if num_items_in_batch is None else "sum"
        # The logits as the output layer would have made them: under the autocast state it
        # ran under (the caller's: Trainer's bf16=True, accelerate), else in the model's
        # dtype. A 16-bit model outside autocast runs under autocast of its own dtype: the
        # same 16-bit logits, and the loss in fp32 from them (fusedce's linear loss under
        # autocast computes in fp32 and returns fp32, never rounded), as transformers
        # upcasts its logits.
        device = hidden.device.type
        low = hidden.dtype in (torch.float16, torch.bfloat16)
        if autocast is None and low:
            autocast = hidden.dtype
        with torch.autocast(device, dtype=autocast or torch.get_autocast_dtype(device),
                            enabled=autocast is not None):
            loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                                        target, linear_bias=head.bias, reduction=reduction,
                                        ignore_index=ignore_index, softcap=state.softcap)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        # transformers' ForCausalLMLoss returns fp32 whatever the model's dtype (it takes
        # logits.float()): a float64 model's loss, computed in float64, is returned in fp32
        return loss.float()


def apply(model):
    """Makes ``model`` (a ``transformers`` causal LM of one of the ``CLASSES``, or a
    subclass keeping its forward) compute its labelled loss with gradients enabled with
    ``fusedce.linear_cross_entropy``; returns ``model``. Raises ValueError for another
    model. Applying twice is a no-op; ``remove`` undoes it.

    A custom ``model.loss_function`` (set before or after ``apply``; anything but
    transformers' ``ForCausalLMLoss``) cannot be computed without the logits: the model
    then keeps its own loss path (the logits made, the custom function called on them, as
    unpatched) and ``apply`` or its first labelled forward warns (UserWarning)."""
    kind = _kind(model)
    if getattr(model, _STATE, None) is not None:
        return model
    state = _Applied(model, kind)
    state.follow_head()  # (raises for an output layer it cannot read, changing nothing)
    model.forward = _Forward(state)
    model.loss_function = _LossFunction(state)
    setattr(model, _STATE, state)
    custom = state.custom_loss()
    if custom is not None:
        state.warn_custom(custom)
    return model


def _default_loss():
    from transformers.loss.loss_utils import LOSS_MAPPING

    return LOSS_MAPPING["ForCausalLM"]


def _model_loss(state):
    """The loss function the model had (read lazily: transformers warns on reading it when
    the config names no loss type)."""
    if state.loss_function is not None:
        return state.loss_function
    from transformers.loss.loss_utils import LOSS_MAPPING

    loss_type = getattr(state.model, "loss_type", None)
    return LOSS_MAPPING.get(loss_type, LOSS_MAPPING["ForCausalLM"])


def remove(model):
    """Undoes ``apply``: the model computes its loss from its own logits again. Only
    fusedce's own objects are taken away: a ``forward`` or ``loss_function`` set on the
    model after ``apply`` (a wrapper of the patched forward, as accelerate's ``prepare``
    installs) stays, and a wrapped patched forward then runs the model's own."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    state.applied = False
    state.unpatch_head()
    _restore(model, "forward", _Forward, state, state.forward)
    _restore(model, "_loss_function", _LossFunction, state, state.loss_function)
    delattr(model, _STATE)
    return model


def _restore(model, name, kind, state, saved):
    """``model.__dict__[name]`` back to ``saved`` (removed where None), only while it is
    still ``apply``'s own object (a ``kind`` of ``state``)."""
    current = model.__dict__.get(name)
    if not (isinstance(current, kind) and current.state is state):
        return
    if saved is None:
        del model.__dict__[name]
    else:
        model.__dict__[name] = saved
