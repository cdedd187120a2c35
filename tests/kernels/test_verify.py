"""verify / commit: every draft node equals decoding its root-to-node path token by token; commit equals
sequential decoding; verify leaves the state alone; exact across group boundaries."""
import pytest
import torch

from lincompile.kernels.linear_attention import reference
from lincompile.methods.spec import get_method

# two roots; depths up to 4, so a tree from a state 3 tokens into a group of 4 crosses two group boundaries
TREE = torch.tensor([-1, 0, 1, 1, -1, 4, 2, 6, 3])


def _path(parents, node):
    path = []
    while node >= 0:
        path.append(node)
        node = int(parents[node])
    return path[::-1]


def _prefilled(c, cut):
    _, state = reference.attention(c.q[:, :, :cut], c.k[:, :, :cut], c.v[:, :, :cut], c.mask[:, :cut], None, [],
                                   c.params, c.spec, c.scale, True)
    drafts = [x[:, :, cut:] for x in (c.q, c.k, c.v)]
    return state, drafts


def _check_tree(c, state, drafts, parents, diff):
    q, k, v = drafts
    before = [s.clone() for s in state]
    out, extras = reference.verify(q, k, v, state, c.params, c.spec, c.scale, parents)
    assert diff(state, before) == 0.0
    nodes = range(q.shape[2])
    chain = parents is None
    if chain:  # a chain is also what the parallel form computes from the same state
        parallel, _ = reference.attention(q, k, v, None, None, state, c.params, c.spec, c.scale, True)
        assert diff([out], [parallel]) < 1e-10
    for node in nodes:
        path = list(range(node + 1)) if chain else _path(parents, node)
        pick = [x[:, :, path] for x in drafts]
        expected, expected_state = reference.recurrent(*pick, None, state, c.params, c.spec, c.scale)
        assert diff([out[:, :, node]], [expected[:, :, -1]]) < 1e-10
        assert diff(reference.commit(state, extras, path), expected_state) < 1e-10  # fp64; the bar is 1e-6


def test_tree_and_chain_verify_equal_path_decoding(causal_method, case, small_spec, diff):
    c = case(small_spec(causal_method), 7 + len(TREE), seed=2)
    state, drafts = _prefilled(c, 7)  # row 0 sits 3 tokens into a group of 4, row 1 (one pad) 2 tokens in
    _check_tree(c, state, drafts, TREE, diff)
    _check_tree(c, state, [x[:, :, :5] for x in drafts], None, diff)


def test_default_group_size_tree_crossing_the_boundary(case, diff):
    c = case(get_method("augmented"), 62 + len(TREE), seed=4, padding=False)
    state, drafts = _prefilled(c, 62)  # 2 tokens before the end of the first group of 64
    _check_tree(c, state, drafts, TREE, diff)


@pytest.mark.parametrize("padding, parents", [(True, TREE), (False, TREE), (False, None)])
def test_commit_in_fp32_matches_sequential_decoding(causal_method, case, small_spec, padding, parents):
    """Commit equals decoding the path one token per call through the decode path (the recurrent form, what a
    single-token op call runs on CPU) bit for bit; in fp64, tests tie the recurrent form to the parallel one.
    Without padding every row sits at the same position (commit's runs of copies); the chain of 9 tokens from
    3 tokens into a group of 4 completes three groups, the tree path ends inside one. The state passed in is
    left as it was."""
    c = case(small_spec(causal_method), 7 + len(TREE), dtype=torch.float32, seed=6, padding=padding)
    state, (q, k, v) = _prefilled(c, 7)
    _, extras = reference.verify(q, k, v, state, c.params, c.spec, c.scale, parents)
    path = _path(TREE, 8) if parents is not None else list(range(len(TREE)))
    expected = state
    for i in path:
        _, expected = reference.recurrent(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], None, expected,
                                          c.params, c.spec, c.scale)
    before = [s.clone() for s in state]
    for got, want in zip(reference.commit(state, extras, path), expected):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(state, before))


def test_empty_path_and_bad_paths(case, small_spec):
    c = case(small_spec("augmented"), 7 + len(TREE), seed=1)
    state, (q, k, v) = _prefilled(c, 7)
    _, extras = reference.verify(q, k, v, state, c.params, c.spec, c.scale, TREE)
    assert all(a is b for a, b in zip(reference.commit(state, extras, []), state))
    for bad in ([1], [0, 2], [0, 1, 3, 9]):
        with pytest.raises(ValueError, match="accepted_path"):
            reference.commit(state, extras, bad)
    with pytest.raises(ValueError, match="parents"):
        reference.verify(q, k, v, state, c.params, c.spec, c.scale, torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1]))


def test_verify_refuses_leaking_and_bidirectional_methods(case):
    for name in ("augmented-centered", "linformer"):
        c = case(get_method(name), 4)
        with pytest.raises(ValueError, match="causal"):
            reference.verify(c.q, c.k, c.v, [], c.params, c.spec, c.scale)
