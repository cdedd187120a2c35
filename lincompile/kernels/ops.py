"""The `lincompile::attention` op: one graph node per attention site, whatever the method.

Schema:
    attention(q, k, v, key_mask?, bias?, state[], params[], spec, scale, causal) -> (out, new_state[])
`spec` is a `MethodSpec` as JSON, so a graph carries its own math. The op has a fake kernel (for
torch.export / torch.compile) and autograd: the selected implementation's own backward where it has one and
it applies (the generated Triton backward for training prefills), otherwise recomputation through it.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from lincompile.kernels import registry
from lincompile.kernels.linear_attention.reference import init_state
from lincompile.kernels.linear_attention.state import accumulation_dtype, cast
from lincompile.methods.params import param_trainable
from lincompile.methods.spec import MethodSpec


@functools.lru_cache(maxsize=256)
def _spec(spec_json: str) -> MethodSpec:
    return MethodSpec.from_json(spec_json)


def _run(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, bias: Tensor | None, state: list[Tensor],
         params: list[Tensor], spec: str, scale: float, causal: bool) -> tuple[Tensor, list[Tensor]]:
    """The selected implementation's call. A multi-token call given the initial state explicitly (every part
    zero, as training feeds it) passes it as [], which implementations may exploit (the reference then skips
    the queries' product with S and z): the same numbers, since [] means exactly that state. Not when a part
    requires grad (its gradient is wanted). A causal linear call returns its state in the accumulation dtype."""
    method = _spec(spec)
    impl = registry.select(method, q.device).impl
    if q.shape[2] > 1 and not method.has_kv_cache and not any(t.requires_grad for t in state) and _initial(state):
        state = []  # (a KV cache of zeros is not the empty one: it keeps its slots)
    out, new_state = impl(q, k, v, key_mask, bias, list(state), list(params), method, scale, causal)
    if causal and not method.has_kv_cache:  # the state the fake kernel promises, whatever dtype came in
        acc = accumulation_dtype(q.dtype)
        new_state = [cast(t, acc) if t.is_floating_point() else t for t in new_state]
    return out, new_state


def _initial(state: list[Tensor]) -> bool:
    """True when every part of `state` is known to be zero (also for []); on a GPU, reading the values syncs once.
    Tracing tensors carry no values, and a CUDA graph being captured may not sync, so there this is False."""
    if any(is_fake(t) for t in state):
        return False
    if any(t.is_cuda for t in state) and torch.cuda.is_current_stream_capturing():
        return False
    return not any(bool(t.any()) for t in reversed(state))  # the last part first: a small one (position counter)


@torch.library.custom_op("lincompile::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, bias: Tensor | None,
              state: list[Tensor], params: list[Tensor], spec: str, scale: float,
              causal: bool) -> tuple[Tensor, list[Tensor]]:
    with torch.no_grad():  # autograd is the op's own (below); the implementation never records a graph
        out, new_state = _run(q, k, v, key_mask, bias, state, params, spec, scale, causal)
    storages = {_storage(t) for t in (q, k, v, key_mask, bias, *state, *params) if t is not None}
    return _fresh(out, storages), [_fresh(s, storages) for s in new_state]


def _storage(t: Tensor) -> int:
    """The address of `t`'s storage, `t.untyped_storage().data_ptr()`: computed from the tensor's own pointer
    (building a storage object costs more) but for an empty tensor, whose pointer is null."""
    if not t.numel():
        return t.untyped_storage().data_ptr()
    return t.data_ptr() - t.storage_offset() * t.element_size()


def _fresh(t: Tensor, storages: set[int]) -> Tensor:
    """`t` contiguous and in storage of its own: a custom op's outputs may not alias its inputs (an
    implementation may hand back a state part it left unchanged, e.g. a decode step that folds no group)."""
    if _storage(t) in storages:
        return t.clone(memory_format=torch.contiguous_format)
    return t.contiguous()


@attention.register_fake
def _attention_fake(q, k, v, key_mask, bias, state, params, spec, scale, causal):
    method = _spec(spec)
    out = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    if not state:
        state = init_state(method, k.shape[0], k.shape[1], k.shape[3], v.shape[3], q.device, q.dtype)
    if method.has_kv_cache:
        keys, values, mask = state
        total = keys.shape[2] + k.shape[2]
        new_state = [k.new_empty(k.shape[0], k.shape[1], total, k.shape[3]),
                     v.new_empty(v.shape[0], v.shape[1], total, v.shape[3]),
                     mask.new_empty(k.shape[0], total)]
    elif causal:
        acc = accumulation_dtype(q.dtype)
        new_state = [s.new_empty(s.shape, dtype=acc if s.is_floating_point() else s.dtype) for s in state]
    else:
        new_state = [s.new_empty(s.shape) for s in state]
    return out, new_state


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_mask, bias, state, params, spec, scale, causal = inputs
    ctx.set_materialize_grads(False)  # an output the loss never used (training drops the state) gets None, not 0
    ctx.save_for_backward(q, k, v, *params)
    ctx.num_params = len(params)
    ctx.rest = (key_mask, bias, list(state), spec, scale, causal)
    ctx.state_grad = [t.requires_grad for t in state]  # a past state computed with autograd (carried across calls)
    ctx.bias_grad = bias is not None and bias.requires_grad  # a trainable bias (T5's relative positions)


def _from_the_start(key_mask: Tensor | None, state: list[Tensor]) -> bool:
    """True when the call is known to start from the initial state (none, or all zeros) with every key real (no
    mask, or an all-true one); on a GPU, reading the values syncs once per site. Tracing tensors carry no values,
    so under tracing this is False: the traced backward recomputes through the implementation, right for any
    values."""
    if key_mask is not None and (is_fake(key_mask) or not bool(key_mask.all())):
        return False
    return _initial(state)


def _backward(ctx, grad_out, grad_state):
    q, k, v, *params = ctx.saved_tensors
    key_mask, bias, state, spec, scale, causal = ctx.rest
    method = _spec(spec)
    fast = registry.select(method, q.device).backward
    trainable = param_trainable(method)
    if (grad_out is not None and fast is not None and fast.applies(q, k, v, bias, method, causal)
            and not any(p.requires_grad and not t for p, t in zip(params, trainable))
            and not any(ctx.state_grad) and _from_the_start(key_mask, state)):
        gq, gk, gv, gtrained = attention_backward(q, k, v, params, grad_out, list(grad_state), spec, scale)
        gtrained = iter(gtrained)
        gparams = [next(gtrained) if t else None for t in trainable]
        return gq, gk, gv, None, None, [None] * len(state), gparams, None, None, None
    inputs = [t.detach().requires_grad_(t.requires_grad or t.is_floating_point()) for t in (q, k, v, *params)]
    state = [t.detach().requires_grad_() if wanted else t for t, wanted in zip(state, ctx.state_grad)]
    bias = bias.detach().requires_grad_() if ctx.bias_grad else bias
    with torch.enable_grad():
        out, new_state = _run(inputs[0], inputs[1], inputs[2], key_mask, bias, state, inputs[3:], spec,
                              scale, causal)
        pairs = [(t, g) for t, g in zip([out, *new_state], [grad_out, *grad_state])
                 if g is not None and t.requires_grad]
        leaves = inputs + [t for t, wanted in zip(state, ctx.state_grad) if wanted] + ([bias] if ctx.bias_grad else [])
        grads = torch.autograd.grad([p[0] for p in pairs], leaves, [p[1] for p in pairs], allow_unused=True)
    gq, gk, gv, *rest = grads
    gbias = rest.pop() if ctx.bias_grad else None
    gparams, gstate = rest[:len(params)], iter(rest[len(params):])
    return (gq, gk, gv, None, gbias, [next(gstate) if wanted else None for wanted in ctx.state_grad],
            list(gparams), None, None, None)


attention.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("lincompile::attention_backward", mutates_args=())
def attention_backward(q: Tensor, k: Tensor, v: Tensor, params: list[Tensor], grad_out: Tensor,
                       grad_state: list[Tensor | None], spec: str, scale: float
                       ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """(dq, dk, dv, gradients of the trainable params) of `attention` by the selected implementation's own
    backward, one graph node."""
    method = _spec(spec)
    impl = registry.select(method, q.device).backward.impl
    gq, gk, gv, gparams = impl(q, k, v, list(params), method, scale, grad_out, list(grad_state))
    storages = {_storage(t) for t in (q, k, v, grad_out, *params) if t is not None}
    return _fresh(gq, storages), _fresh(gk, storages), _fresh(gv, storages), [_fresh(g, storages) for g in gparams]


@attention_backward.register_fake
def _attention_backward_fake(q, k, v, params, grad_out, grad_state, spec, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),  # contiguous, as the op's are
            [p.new_empty(p.shape) for p, t in zip(params, param_trainable(_spec(spec))) if t])
