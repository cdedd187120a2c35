"""`detect_attention`: find every softmax attention in the graph and record an `AttentionSite`.

Patterns (passes/patterns) find the q/k/v nodes, the scale and the mask terms. The mask *kind* is
then read numerically: the mask terms are evaluated on the captured example inputs (which have a
padded row), turned into an allowed-pattern and compared with causal / padding / both / nothing.
Anything else is `custom` (an additive bias such as T5's relative positions), which only the exact
softmax method can reproduce. A causal mask that lets each query see only its last W keys is a sliding window
(`AttentionSite.window`): read on the example when W is shorter than it, else on a second, long probe of the
mask terms alone (one unpadded row of `WINDOW_PROBE` tokens).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from lincompile.methods.spec import MethodSpec
from lincompile.passes.base import Pass, PassContext, register_pass
from lincompile.passes.pictures import between
from lincompile.passes.patterns.attention_forms import MASKED, PATTERNS, SOFTMAX_OPS
from lincompile.passes.patterns.common import SiteMatch, depends_on, module_path, val

aten = torch.ops.aten

#: Tokens of the long mask probe: sliding windows up to WINDOW_PROBE - 1 keys are found (Mistral's and
#: Starcoder2's 4096, Gemma's 512 to 4096, Phi-3's 2047, GPT-Neo's 256); longer ones go unseen.
WINDOW_PROBE = 4098
#: Ops whose presence among a mask's ancestors means it is computed from activations (not from the inputs
#: alone): the long probe would run the model's layers, so it is skipped.
_HEAVY = {aten.linear.default, aten.mm.default, aten.bmm.default, aten.matmul.default, aten.addmm.default,
          aten.baddbmm.default, aten.einsum.default, aten.convolution.default,
          aten.scaled_dot_product_attention.default, aten.softmax.int, aten._softmax.default}


@dataclass
class AttentionSite:
    """One attention found in the graph (node references stay out of the JSON view)."""

    index: int
    path: str
    form: str
    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    scale: float
    mask_kind: str  # causal | causal+padding | padding | none | custom
    causal: bool
    cross: bool
    dtype: str
    dropout_p: float
    key_mask_input: str | None = None
    window: int | None = None  # causal sliding window: each query sees its last `window` keys (itself included)
    softcap: float = 0.0  # scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2); 0: none
    sinks: str | None = None  # the [heads] parameter of attention-sink logits (GPT-OSS); None: none
    match: SiteMatch | None = field(default=None, repr=False)

    def decodable(self, spec: MethodSpec) -> bool:
        """Causal self-attention that `spec` can run through a recurrent state: a causal-safe method (not the
        centered conv, which reads later tokens), without a custom bias or with one that `spec` drops (every method
        but exact softmax, which keeps the bias and so needs whole sequences)."""
        return (self.causal and not self.cross and spec.causal_safe
                and (self.mask_kind != "custom" or spec.kind != "softmax"))

    def to_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in (
            "index", "path", "form", "heads", "kv_heads", "head_dim", "v_head_dim", "scale", "mask_kind",
            "causal", "cross", "dtype", "dropout_p", "key_mask_input", "window", "softcap", "sinks")}


@dataclass
class UnmatchedSoftmax:
    """A softmax that looks like attention but matched no pattern."""

    node: str
    target: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.target}) in {self.path}: {self.reason}"


class _Recorder(fx.Interpreter):
    """Runs the graph (only the `needed` nodes, if given) and keeps the values of the `wanted` ones."""

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node], needed: set[fx.Node] | None = None) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.needed = needed
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node) -> object:
        if self.needed is not None and n not in self.needed and n.op not in ("placeholder", "output"):
            return None
        result = super().run_node(n)
        if n in self.wanted:
            self.values[n] = result
        return result


def _allowed_and_bias(match: SiteMatch, values: dict, t: int, s: int) -> tuple[torch.Tensor, bool]:
    allowed = torch.ones(1, 1, t, s, dtype=torch.bool)
    has_bias = False
    for node, kind, coefficient in match.mask_terms:
        value = values[node].cpu()  # the probe runs on the CPU whatever device the model is on
        if kind == "additive":
            scaled = value.float() * coefficient  # (bf16 holds -1e4 as -9984: MASKED within the dtype's rounding)
            keep = scaled > MASKED * (1 - torch.finfo(value.dtype).eps if value.is_floating_point() else 1)
            has_bias = has_bias or bool((scaled[keep] != 0).any())
            allowed = allowed & keep
        elif kind == "allow_bool":
            allowed = allowed & value.bool()
        elif kind == "allow_01":
            allowed = allowed & (value != 0)
        else:
            allowed = allowed & ~value.bool()
    if match.is_causal:
        allowed = allowed & torch.ones(t, s, dtype=torch.bool).tril(s - t)
    return allowed, has_bias


def _band(t: int, s: int, window: int | None) -> torch.Tensor:
    """[t, s] causal pattern of t queries ending at key s - 1, each seeing at most its last `window` keys."""
    causal = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    return causal if window is None else causal & ~torch.ones(t, s, dtype=torch.bool).tril(s - t - window)


def _window(allowed: torch.Tensor, keys: torch.Tensor) -> int | None:
    """How many keys the last query of a row with every key real may see, when fewer than all (a window)."""
    rows = [b for b in range(keys.shape[0]) if bool(keys[b].all())]
    if not rows:
        return None
    seen = int(allowed[rows[0], 0, -1].sum())
    return seen if 0 < seen < allowed.shape[-1] else None


def _classify(match: SiteMatch, values: dict, placeholders: dict[str, fx.Node],
              inputs: dict[str, torch.Tensor]) -> tuple[str, bool, str | None, int | None]:
    """(mask kind, causal, name of the graph input that holds the key padding mask if any, sliding window).

    A custom bias still has a structure (causal, padding) that linear methods keep; a custom self-attention mask
    that never lets a query see a later key is causal, and one that never lets it see padding keeps the padding
    input.
    """
    qv, kv = val(match.q), val(match.k)
    t, s = int(qv.shape[2]), int(kv.shape[2])
    allowed, has_bias = _allowed_and_bias(match, values, t, s)
    batch = int(qv.shape[0])
    allowed = allowed.expand(batch, allowed.shape[1], t, s)
    key_input = None
    for name, node in placeholders.items():
        if "attention_mask" in name and any(depends_on(term[0], {node}) for term in match.mask_terms):
            if inputs[name].shape[-1] == s:
                key_input = name
    keys = inputs[key_input].bool().cpu() if key_input else torch.ones(batch, s, dtype=torch.bool)
    real_rows = keys[:, s - t:] if t <= s and key_input else torch.ones(batch, t, dtype=torch.bool)
    window = _window(allowed, keys) if t == s else None
    causal = _band(t, s, window)
    candidates = [("causal+padding", causal[None] & keys[:, None, :]),
                  ("padding", keys[:, None, :].expand(batch, t, s)), ("causal", causal[None].expand(batch, t, s)),
                  ("none", torch.ones(batch, t, s, dtype=torch.bool))]
    if key_input is None:
        candidates = candidates[2:]
    for kind, expected in candidates:
        ok = all(bool((allowed[b, :, real_rows[b]] == expected[b, real_rows[b]][None]).all()) for b in range(batch))
        if ok:
            is_causal = kind.startswith("causal")
            return (("custom" if has_bias else kind), is_causal, key_input if "padding" in kind else None,
                    window if is_causal else None)
    below = _band(t, s, None)
    is_causal = t == s and all(bool((allowed[b, :, real_rows[b]] <= below[real_rows[b]][None]).all())
                               for b in range(batch))
    padded = key_input is not None and bool((allowed <= keys[:, None, None, :]).all())
    return "custom", is_causal, key_input if padded else None, None


def _probe_windows(gm: fx.GraphModule, example_inputs: dict[str, torch.Tensor], input_names: list[str],
                   sites: list[AttentionSite], length: int) -> list[str]:
    """Read the masks again on one unpadded row of `length` tokens, running the mask terms' ancestors alone: a
    causal site whose queries see only their last W keys gets `window` W (one the short example cannot show); a
    site whose pattern is then neither its kind's nor a window (chunked attention, a bidirectional local window)
    becomes `custom`, which exact softmax keeps as a bias. Returns notes."""
    probed = [site for site in sites if site.window is None and site.match.mask_terms and not site.cross
              and site.mask_kind in ("causal", "causal+padding", "padding", "none")]
    ids = next((v for k, v in example_inputs.items() if "input_ids" in k and "decoder" not in k), None)
    if (not probed or any("decoder" in k for k in example_inputs) or not isinstance(ids, torch.Tensor)
            or length <= ids.shape[1]):
        return []
    wanted = {term[0] for site in probed for term in site.match.mask_terms}
    needed = _ancestors(wanted)
    if any(n.op == "call_function" and n.target in _HEAVY for n in needed):
        return ["masks not probed at length: they are computed from activations"]
    seq = ids.shape[1]
    inputs = []
    for name in input_names:
        value = example_inputs[name]
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == seq:
            if "mask" in name:
                value = torch.ones(1, length, dtype=value.dtype, device=value.device)
            elif "position" in name:
                value = torch.arange(length, device=value.device)[None]
            else:
                value = value[:1].repeat(1, -(-length // seq))[:, :length]
        inputs.append(value)
    recorder = _Recorder(gm, wanted, needed)
    try:
        with torch.no_grad():
            recorder.run(*inputs)
    except Exception as exc:  # a mask builder that cannot take the probe (e.g. a table shorter than it)
        return [f"masks not probed at {length} tokens: {type(exc).__name__}: {str(exc).splitlines()[0]}"]
    notes: list[str] = []
    seen: dict[tuple, torch.Tensor | None] = {}  # sites sharing mask terms (usually all layers) share the pattern
    for site in probed:
        key = tuple((id(node), kind, coefficient) for node, kind, coefficient in site.match.mask_terms)
        if key not in seen:
            try:
                seen[key] = _allowed_and_bias(site.match, recorder.values, length, length)[0][0, 0]
            except RuntimeError as exc:  # a mask read from a table shorter than the probe (GPT-Neo's buffer)
                notes.append(f"site {site.index}: mask not probed at {length} tokens: {exc}")
                seen[key] = None
        allowed = seen[key]
        if allowed is None:
            continue
        expected = _band(length, length, None) if site.causal else torch.ones(length, length, dtype=torch.bool)
        if bool((allowed == expected).all()):
            continue
        window = _window(allowed[None, None], torch.ones(1, length, dtype=torch.bool)) if site.causal else None
        if window is not None and bool((allowed == _band(length, length, window)).all()):
            site.window = window
            notes.append(f"site {site.index} ({site.path}): sliding window of {window} keys")
        else:
            site.mask_kind = "custom"  # the padding input stays: a linear method, dropping the bias, keeps it
            notes.append(f"site {site.index} ({site.path}): at {length} tokens its mask is neither "
                         f"{'causal' if site.causal else 'full'} nor a sliding window: custom")
    return notes


def _ancestors(nodes: set[fx.Node], values_only: bool = False) -> set[fx.Node]:
    """`nodes` and every node they are computed from (`values_only`: not through a size read from a tensor)."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            if not (values_only and node.target is aten.sym_size.int):
                stack.extend(node.all_input_nodes)
    return seen


def _token_inputs(node: fx.Node, tokens: set[fx.Node]) -> set[fx.Node]:
    """The token inputs (`tokens`) whose values `node` is computed from (a size read from one does not count):
    queries computed from tokens the keys are not (a decoder's over an encoder's) make cross-attention, whatever
    the two lengths. (A decoder that makes its tokens from the encoder's inputs, as BART's does when given no
    decoder_input_ids, is not told apart this way: capture such a model with decoder inputs.)"""
    return _ancestors({node}, values_only=True) & tokens


def _binary_masks(match: SiteMatch, values: dict, unmatched: list[UnmatchedSoftmax]) -> bool:
    """Whether every mask the scores are multiplied by ("allow_01" terms) holds only 0 and 1 in the example; if
    not, the site is reported unmatched (it is not a mask but a weighting) and False."""
    for node, kind, _ in match.mask_terms:
        value = values[node]
        if kind == "allow_01" and not bool(((value == 0) | (value == 1)).all()):
            unmatched.append(UnmatchedSoftmax(match.output.name, str(match.output.target), module_path(match.output),
                                              f"scores multiplied by {node.name}, which holds values other than 0 "
                                              "and 1 (a weighting, not a mask)"))
            return False
    return True


def _sinks_checked(gm: fx.GraphModule, match: SiteMatch) -> SiteMatch | str:
    """`match`, or why its attention sinks are not the op's: one logit per query head."""
    shape = tuple(operator.attrgetter(match.sinks)(gm).shape)
    heads = val(match.q).shape[1]
    if shape != (heads,):
        return f"attention sinks {match.sinks} of shape {shape}, not one logit per head ({heads},)"
    return match


def find_sites(gm: fx.GraphModule, example_inputs: dict[str, torch.Tensor], input_names: list[str],
               max_tokens: int | None = None) -> tuple[list[AttentionSite], list[UnmatchedSoftmax], list[str]]:
    """All attention sites, the attention-like softmaxes that matched nothing, and notes (`max_tokens`: the
    longest sequence the graph takes, if limited)."""
    matches: list[SiteMatch] = []
    unmatched: list[UnmatchedSoftmax] = []
    notes: list[str] = []
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        for pattern in PATTERNS:
            result = pattern(node)
            if isinstance(result, SiteMatch) and result.sinks is not None:
                result = _sinks_checked(gm, result)
            if isinstance(result, SiteMatch):
                matches.append(result)
                claimed.update(result.nodes)
                break
            if isinstance(result, str):
                unmatched.append(UnmatchedSoftmax(node.name, str(node.target), module_path(node), result))
                break
        else:
            if node.op == "call_function" and node.target in SOFTMAX_OPS and node not in claimed:
                notes.append(f"left alone: {node.name} in {module_path(node)} (softmax that is not attention)")
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    wanted = {term[0] for m in matches for term in m.mask_terms}
    recorder = _Recorder(gm, wanted)
    if wanted:
        with torch.no_grad():
            recorder.run(*[example_inputs[n] for n in input_names])
    matches = [m for m in matches if _binary_masks(m, recorder.values, unmatched)]
    tokens = {placeholders[n] for n in input_names if "input_ids" in n or "inputs_embeds" in n}
    sites = []
    for index, m in enumerate(matches):
        kind, causal, key_input, window = _classify(m, recorder.values, placeholders, example_inputs)
        qv, kv, vv = val(m.q), val(m.k), val(m.v)
        cross = str(qv.shape[2]) != str(kv.shape[2]) or bool(_token_inputs(m.q, tokens) - _token_inputs(m.k, tokens))
        sites.append(AttentionSite(
            index=index, path=module_path(m.output), form=m.form, heads=int(qv.shape[1]),
            kv_heads=int(kv.shape[1]), head_dim=int(qv.shape[3]), v_head_dim=int(vv.shape[3]),
            scale=m.scale, mask_kind=kind, causal=causal,
            cross=cross, dtype=str(qv.dtype).replace("torch.", ""), dropout_p=m.dropout_p,
            key_mask_input=key_input, window=window, softcap=m.softcap, sinks=m.sinks, match=m,
        ))
    notes += _probe_windows(gm, example_inputs, input_names, sites, min(WINDOW_PROBE, max_tokens or WINDOW_PROBE))
    return sites, unmatched, notes


@register_pass
class DetectAttention(Pass):
    name = "detect_attention"
    description = "find every softmax attention (sdpa op or eager matmul-softmax chain) and record its site"
    not_after = ("linearize",)

    def run(self, ctx: PassContext) -> list[str]:
        cap = ctx.captured
        ctx.sites, ctx.unmatched, notes = find_sites(cap.gm, cap.example_inputs, cap.input_names, cap.max_tokens)
        notes = [f"{len(ctx.sites)} attention sites"] + notes
        notes += [f"unmatched: {u}" for u in ctx.unmatched]
        return notes

    def pictures(self, ctx: PassContext) -> list[tuple[str, list[fx.Node], str]]:
        out = []
        for site in ctx.sites:
            m = site.match
            nodes = between([m.q, m.k, m.v, *(t[0] for t in m.mask_terms)], m.output)
            out.append((f"site_{site.index}_before", nodes, f"site {site.index} {site.path} ({site.form})"))
        return out
