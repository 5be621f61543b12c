"""Hugging Face causal LMs whose training loss never holds the logits: ``fusedce.hf.apply``.

``apply(model)`` makes an instantiated ``transformers`` causal LM compute its loss, when its
forward gets ``labels``, with :func:`fusedce.linear_cross_entropy` straight from the final
hidden states and the output embedding, one chunk of tokens at a time. Nothing else of the
model changes: the same ``forward`` runs (the base model, ``logits_to_keep``, the model's own
arguments), except that while a labelled forward runs, the output layer hands its input to
the loss instead of computing the (tokens x vocab) logits, and the loss function is
fusedce's. What the model's own loss does is kept:

- the one-token label shift (``labels`` padded with ``-100``, or ``shift_labels`` as given),
  ``ignore_index=-100``;
- ``num_items_in_batch`` (gradient accumulation): the sum of the token losses over it;
- Gemma-2's ``final_logit_softcapping`` (fusedce's ``softcap``);
- the output embedding tied to the input one or not, with its bias where it has one.

Without ``labels`` (inference, ``generate``) the model returns exactly its own logits. With
them, the output's ``logits`` is None: none were made. ``remove(model)`` undoes ``apply``.

``import fusedce`` never imports ``transformers``; this module needs it only in ``apply``.
"""

import functools
import inspect

import torch

from .linear import linear_cross_entropy

# model_type -> how its logits come from the output layer (all: ``lm_head(hidden)``;
# "softcap": then Gemma-2's ``cap * tanh(logits / cap)``)
FAMILIES = {
    "gpt2": "plain",
    "llama": "plain",
    "mistral": "plain",
    "qwen2": "plain",
    "gemma2": "softcap",
    "phi3": "plain",
}

_STATE = "_fusedce_hf"


class _Applied:
    """What ``apply`` changed on one model, and the hidden states of the forward running."""

    def __init__(self, model, head):
        self.model, self.head = model, head
        self.active = False
        self.hidden = None
        self.softcap = None  # the running forward's final logit softcap (lifted from config)
        self.forward = model.__dict__.get("forward")  # an instance attribute already there
        self.head_forward = head.__dict__.get("forward")
        self.loss_function = model.__dict__.get("_loss_function")


def _family(model):
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"fusedce.hf.apply supports the causal LMs of {sorted(FAMILIES)} "
                         f"(config.model_type); got {model_type!r} "
                         f"({type(model).__name__})")
    return FAMILIES[model_type]


def apply(model):
    """Makes ``model`` (a ``transformers`` causal LM of a family in ``FAMILIES``) compute
    its labelled loss with ``fusedce.linear_cross_entropy``; returns ``model``. Applying
    twice is a no-op; ``remove`` undoes it."""
    family = _family(model)
    if getattr(model, _STATE, None) is not None:
        return model
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"fusedce.hf.apply needs an nn.Linear output embedding, got "
                         f"{type(head).__name__}")
    state = _Applied(model, head)
    original_forward = model.forward
    original_head = head.forward
    signature = inspect.signature(original_forward)  # once, not on every call

    def head_forward(hidden):
        if not state.active:
            return original_head(hidden)
        state.hidden = hidden
        # what the model reads as its logits: the right shape, one element of memory
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], head.out_features)

    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None,
                      ignore_index=-100, shift_labels=None, **kwargs):
        if not state.active or state.hidden is None:  # called outside a labelled forward
            return _model_loss(state)(logits, labels, vocab_size,
                                      num_items_in_batch=num_items_in_batch,
                                      ignore_index=ignore_index, shift_labels=shift_labels,
                                      **kwargs)
        hidden, state.hidden = state.hidden, None
        if shift_labels is None:  # tokens < n predict n, as transformers' ForCausalLMLoss
            labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        target = shift_labels.reshape(-1).to(hidden.device)
        softcap = state.softcap
        reduction = "mean" if num_items_in_batch is None else "sum"
        # a 16-bit model: the loss in fp32, as transformers upcasts its logits (fusedce's
        # linear loss under autocast computes in fp32 and returns fp32, never rounded)
        low = hidden.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(hidden.device.type, dtype=hidden.dtype, enabled=low):
            loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                                        target, linear_bias=head.bias, reduction=reduction,
                                        ignore_index=ignore_index, softcap=softcap)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    @functools.wraps(original_forward)  # Trainer reads the signature's argument names
    def forward(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        if bound.arguments.get("labels") is None:
            return original_forward(*args, **kwargs)
        config = model.config
        cap = getattr(config, "final_logit_softcapping", None) if family == "softcap" else None
        state.active, state.hidden, state.softcap = True, None, cap
        if cap is not None:
            config.final_logit_softcapping = None  # the loss applies it, per chunk
        try:
            out = original_forward(*args, **kwargs)
        finally:
            state.active = False
            if cap is not None:
                config.final_logit_softcapping = cap
        state.hidden = None  # (had the loss not been asked for)
        if isinstance(out, tuple):  # return_dict=False: (loss, logits, ...), logits None
            return out[:1] + (None,) + out[2:]
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})

    model.forward = forward
    head.forward = head_forward
    model.loss_function = loss_function
    setattr(model, _STATE, state)
    return model


def _model_loss(state):
    """The loss function the model had (read lazily: transformers warns on reading it when
    the config names no loss type)."""
    if state.loss_function is not None:
        return state.loss_function
    from transformers.loss.loss_utils import LOSS_MAPPING

    loss_type = getattr(state.model, "loss_type", None)
    return LOSS_MAPPING.get(loss_type, LOSS_MAPPING["ForCausalLM"])


def remove(model):
    """Undoes ``apply``: the model computes its loss from its own logits again."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    for obj, name, saved in ((model, "forward", state.forward),
                             (state.head, "forward", state.head_forward)):
        if saved is None:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = saved
    if state.loss_function is None:
        model.__dict__.pop("_loss_function", None)
    else:
        model._loss_function = state.loss_function
    delattr(model, _STATE)
    return model
