"""`capture`'s fallback when torch's constraint solver refuses named dims over a guard that always holds."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.exc import UserError, UserErrorType

import lincompile
from lincompile.api import capture_model
from lincompile.testing.tiny import tiny_model

_EXPORT = torch.export.export


def test_refused_named_dims_export_again_with_dynamic_dims(request):
    model = tiny_model("llama")
    expected = lincompile.optimize(model, "augmented")
    calls = request.getfixturevalue("refuse_named_dims")
    linear = lincompile.optimize(model, "augmented")
    assert calls == ["refused", "retried"]
    assert [(s.heads, s.kv_heads) for s in linear.sites] == [(4, 2)] * 2  # GQA seen through the traced repeat_kv
    for batch, tokens in [(1, 1), (3, 7), (2, 40)]:
        ids = torch.randint(0, 128, (batch, tokens))
        torch.testing.assert_close(linear(ids).logits, expected(ids).logits, rtol=1e-5, atol=1e-5)
    state = linear(ids[:, :39]).past_state
    torch.testing.assert_close(linear(ids[:, 39:], past_state=state).logits[:, -1], expected(ids).logits[:, -1],
                               rtol=1e-5, atol=1e-5)


def test_a_specialised_fallback_raises_the_original_error(monkeypatch):
    def static_fallback(model, args, kwargs, **options):
        shapes = options.get("dynamic_shapes") or {}
        if any(isinstance(d, torch.export.Dim) for dims in shapes.values() if isinstance(dims, dict)
               for d in dims.values()):
            raise UserError(UserErrorType.CONSTRAINT_VIOLATION, "Constraints violated (seq)! (simulated)")
        return _EXPORT(model, args, kwargs, strict=False)  # every dim specialised to the example's sizes

    monkeypatch.setattr(torch.export, "export", static_fallback)
    with pytest.raises(UserError, match=r"Constraints violated \(seq\)! \(simulated\)"):
        capture_model(tiny_model("llama"))


def test_other_export_errors_are_not_retried(monkeypatch):
    calls = []

    def refuse(model, args, kwargs, **options):
        calls.append(options)
        raise UserError(UserErrorType.DYNAMIC_CONTROL_FLOW, "data-dependent branch (simulated)")

    monkeypatch.setattr(torch.export, "export", refuse)
    with pytest.raises(UserError, match="data-dependent branch"):
        capture_model(tiny_model("llama"))
    assert len(calls) == 1


def test_full_slices_are_normalized_away():
    """`x[:, :, None]` on a dynamic dim traces (torch 2.11) as unsqueeze + slice(dim, 0, INT64_MAX): an identity
    that would hide GQA's repeat_kv from the patterns; a slice that drops elements stays."""
    from torch import fx

    from lincompile.capture.normalize import normalize

    class Slices(torch.nn.Module):
        def forward(self, x):
            full = torch.ops.aten.slice.Tensor(torch.ops.aten.unsqueeze.default(x, 2), 3, 0, 9223372036854775807)
            return full.expand(-1, -1, 2, -1, -1) + 1, torch.ops.aten.slice.Tensor(x, 2, 1, 9223372036854775807)

    gm = fx.symbolic_trace(Slices())
    x = torch.randn(2, 3, 4, 5)
    expected = gm(x)
    assert normalize(gm) == 1
    kept = [n.args[1:] for n in gm.graph.nodes if n.target == torch.ops.aten.slice.Tensor]
    assert kept == [(2, 1, 9223372036854775807)]
    for a, b in zip(gm(x), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["narrowed", "merged"])
def test_a_retry_that_narrows_or_merges_dims_raises_the_original_error(request, case):
    """Guards the named dims would refuse for a real reason: a range narrowed (seq > 4), two dims made one."""
    from lincompile.capture.export import export_dynamic

    class Narrowed(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.shape[1] > 4 else x

    class Merged(torch.nn.Module):
        def forward(self, x, y):
            return x + y

    seq, past = torch.export.Dim("seq", min=1, max=1024), torch.export.Dim("past", min=1, max=1024)
    module, args, shapes = ((Narrowed(), (torch.randn(2, 8),), ({1: seq},)) if case == "narrowed"
                            else (Merged(), (torch.randn(2, 8), torch.randn(2, 8)), ({1: seq}, {1: past})))
    calls = request.getfixturevalue("refuse_named_dims")
    with pytest.raises(UserError, match=r"\(simulated\)"):
        export_dynamic(module, args, None, shapes)
    assert calls == ["refused", "retried"]


def test_normalize_keeps_layouts_and_makes_private_in_place_arithmetic_out_of_place():
    """MPNet writes `scores += bias` (an in-place add the patterns did not know) and `.contiguous().view(...)` after
    a permute (dropping that contiguous broke the view). A clone keeping the layout and an add_ on a private
    temporary go; the needed contiguous and an add_ into a view of an input stay."""
    from lincompile.capture.normalize import normalize

    class Scores(torch.nn.Module):
        def forward(self, x, bias):
            scores = x @ x.transpose(-1, -2) / 4.0
            scores += bias
            bias.transpose(-1, -2)[0] += 1.0  # into an input's view: observable, kept
            out = scores.softmax(-1) @ x
            return out.permute(0, 2, 1, 3).contiguous().view(x.shape[0], x.shape[2], -1).clone()

    x, bias = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 5)
    gm = torch.export.export(Scores(), (x, bias.clone()), strict=False).module()
    expected = gm(x, bias.clone())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.add_.Tensor) == 2 and targets.count(torch.ops.aten.clone.default) == 1
    assert normalize(gm) >= 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.add_.Tensor) == 1 and targets.count(torch.ops.aten.add.Tensor) == 1
    assert targets.count(torch.ops.aten.contiguous.default) == 1 and torch.ops.aten.clone.default not in targets
    torch.testing.assert_close(gm(x, bias.clone()), expected, rtol=0, atol=0)


class _WrittenCopies(torch.nn.Module):
    """Copies an in-place op then writes: the copy itself (`y.mul_`), an element through a view (`y[:, 0] = 0`,
    the Hugging Face idiom), a piece of a split, or the source after copying it."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case

    def forward(self, x):
        h = x * 3.0
        y = h.clone()
        if self.case == "copy":
            y.mul_(2.0)
        elif self.case == "view of the copy":
            y[:, 0] = 0.0
        elif self.case == "piece of the copy":  # split hands out its views through getitem
            y.split(2, 1)[0].mul_(2.0)
        else:
            h.add_(1.0)
        return h + y


@pytest.mark.parametrize("case", ["copy", "view of the copy", "piece of the copy", "source"])
def test_a_copy_that_an_in_place_op_writes_stays(case):
    from lincompile.capture.normalize import normalize

    x = torch.randn(2, 5)
    gm = torch.export.export(_WrittenCopies(case), (x,), strict=False).module()
    expected = gm(x)
    assert torch.ops.aten.clone.default in [n.target for n in gm.graph.nodes]
    normalize(gm)
    # arithmetic on a private copy becomes out of place, and the copy goes; a write through a view keeps it
    assert (torch.ops.aten.clone.default in [n.target for n in gm.graph.nodes]) == (case != "copy")
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("between", ["float", "detach", "full slice"])
def test_in_place_arithmetic_after_a_no_op_cast_goes_out_of_place(between):
    """`scores.float()` (already fp32), `.detach()` or `[..., :]` before `scores += bias`: once that no-op goes, the
    add is on a private temporary and becomes out-of-place, as without it."""
    from lincompile.capture.normalize import normalize

    class Scores(torch.nn.Module):
        def forward(self, x, bias):
            scores = x @ x.transpose(-1, -2)
            scores = {"float": scores.float, "detach": scores.detach, "full slice": lambda: scores[..., :]}[between]()
            scores += bias
            return scores.softmax(-1) @ x

    x, bias = torch.randn(2, 5, 4), torch.randn(2, 5, 5)
    gm = torch.export.export(Scores(), (x, bias), strict=False).module()
    expected = gm(x, bias)
    normalize(gm)
    targets = [n.target for n in gm.graph.nodes]
    assert torch.ops.aten.add_.Tensor not in targets and torch.ops.aten.add.Tensor in targets
    torch.testing.assert_close(gm(x, bias), expected, rtol=0, atol=0)


def test_in_place_arithmetic_that_would_promote_stays_in_place():
    """fp16 scores += an fp32 bias stays fp16 in place; out of place it would promote to fp32 (and the next fp16
    matmul would fail), so normalize leaves it."""
    from lincompile.capture.normalize import normalize

    class Promote(torch.nn.Module):
        def forward(self, x, bias):
            scores = x @ x.transpose(-1, -2)
            scores += bias
            return scores @ x

    x, bias = torch.randn(2, 5, 4).half(), torch.randn(2, 5, 5)
    gm = torch.export.export(Promote(), (x, bias), strict=False).module()
    normalize(gm)
    assert torch.ops.aten.add_.Tensor in [n.target for n in gm.graph.nodes]
    assert gm(x, bias).dtype == torch.float16


class _MergedHeads(torch.nn.Module):
    """Bloom's form: q, k, v [B, H, T, d] merged to [B*H, T, d], scores by `baddbmm` on a [B*H or 1, 1 or T, S]
    bias, viewed 4-D for the mask and softmax, back to 3-D for `bmm` with V. `split` splits the merged dim for the
    softmax (2: as the operands were merged); `transposed` views the scores [.., S, T] instead."""

    def __init__(self, split: int = 2, transposed: bool = False):
        super().__init__()
        self.split, self.transposed = split, transposed

    def forward(self, q, k, v, bias, mask):
        b, h, t, d = q.shape
        s = k.shape[2]
        q3, k3, v3 = q.reshape(b * h, t, d), k.reshape(b * h, s, d), v.reshape(b * h, s, d)
        scores = bias.baddbmm(q3, k3.transpose(-1, -2), beta=0.5, alpha=0.25)
        view = (b * h // self.split, self.split) + ((s, t) if self.transposed else (t, s))
        probs = (scores.view(view) + mask).softmax(-1)
        return torch.bmm(probs.reshape(b * h, t, s), v3)


@pytest.mark.parametrize("case,scores,values", [("merged bias", True, True), ("shared bias", True, True),
                                                ("other split", False, False), ("scores viewed [S, T]", False, False),
                                                ("fp16", False, True)])
def test_merged_heads_products_take_their_4d_form(case, scores, values):
    """`baddbmm` scores and the `bmm` with V over merged heads become 4-D products with the same values, and keep
    their module (site paths read it). Nothing changes where the 4-D view splits the heads otherwise than the
    operands were merged, or transposes the scores; fp16 scores stay fused (their unscaled product could overflow)."""
    from lincompile.capture.merged_heads import split_merged_heads

    g = torch.Generator().manual_seed(0)
    t = 4 if case == "scores viewed [S, T]" else 5  # [B*H, 4, 5] scores seen as [., ., 5, 4]
    q, k, v = (torch.randn(3, 2, n, 4, generator=g) for n in (t, 5, 5))
    bias = torch.randn(1 if case == "shared bias" else 6, 1, 5, generator=g)
    mask = torch.randn(5, t, generator=g) if case == "scores viewed [S, T]" else torch.randn(t, 5, generator=g)
    model = _MergedHeads(1 if case == "other split" else 2, transposed=case == "scores viewed [S, T]")
    if case == "fp16":
        q, k, v, bias, mask = (x.half() for x in (q, k, v, bias, mask))
    gm = torch.export.export(model, (q, k, v, bias, mask), strict=False).module()
    stack = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.baddbmm.default).meta.get("nn_module_stack")
    assert split_merged_heads(gm) == scores + values
    assert all(n.meta.get("nn_module_stack") == stack for n in gm.graph.nodes
               if n.target == torch.ops.aten.matmul.default)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes]
    assert (torch.ops.aten.baddbmm.default in targets) != scores
    assert (torch.ops.aten.bmm.default in targets) != values
    tolerance = 1e-3 if case == "fp16" else 1e-6
    torch.testing.assert_close(gm(q, k, v, bias, mask), model(q, k, v, bias, mask), rtol=tolerance, atol=tolerance)


class _MergedSoftmax(torch.nn.Module):
    """XGLM's form: `bmm` scores over merged heads viewed 4-D for the mask, the softmax over [B*H, T, S], viewed
    4-D and back before the `bmm` with V."""

    def forward(self, q, k, v, mask):
        b, h, t, d = q.shape
        s = k.shape[2]
        q3, k3, v3 = q.reshape(b * h, t, d), k.reshape(b * h, s, d), v.reshape(b * h, s, d)
        scores = torch.bmm(q3, k3.transpose(1, 2)).view(b, h, t, s) + mask
        probs = scores.view(b * h, t, s).softmax(-1)
        return torch.bmm(probs.view(b, h, t, s).view(b * h, t, s), v3)


def test_merged_heads_softmax_takes_its_4d_form_and_view_round_trips_go():
    """After normalize the scores, softmax and value product are 4-D, the softmax feeds the value product directly
    (the views between them went), and the values are the same."""
    from lincompile.capture.normalize import normalize

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 4, generator=g) for _ in range(3))
    mask = torch.randn(5, 5, generator=g)
    model = _MergedSoftmax()
    gm = torch.export.export(model, (q, k, v, mask), strict=False).module()
    normalize(gm)
    targets = [n.target for n in gm.graph.nodes]
    assert torch.ops.aten.bmm.default not in targets
    softmax = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.softmax.int)
    assert softmax.meta["val"].dim() == 4
    assert [u.target for u in softmax.users] == [torch.ops.aten.matmul.default]
    torch.testing.assert_close(gm(q, k, v, mask), model(q, k, v, mask), rtol=1e-6, atol=1e-6)


def test_keys_split_and_transposed_by_one_permute_become_two_steps():
    """permute(x, [0, 2, 3, 1]) is transpose(permute(x, [0, 2, 1, 3]), 2, 3): the same view, which the attention
    patterns read as K^T."""
    from lincompile.capture.normalize import normalize

    class Permuted(torch.nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1)

    x = torch.randn(2, 5, 3, 4)
    gm = torch.export.export(Permuted(), (x,), strict=False).module()
    normalize(gm)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [(n.target, n.args[1:]) for n in nodes] == [(torch.ops.aten.permute.default, ([0, 2, 1, 3],)),
                                                        (torch.ops.aten.transpose.int, (2, 3))]
    out = gm(x)
    assert torch.equal(out, x.permute(0, 2, 3, 1)) and out.stride() == x.permute(0, 2, 3, 1).stride()
