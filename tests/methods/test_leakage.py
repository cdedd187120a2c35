"""The leakage check: only the centered conv (and Linformer, which has no causal form) see the future."""
from lincompile.methods.leakage import leakage_report
from lincompile.methods.spec import methods


def test_only_centered_conv_and_linformer_leak():
    report = leakage_report()
    assert [r.name for r in report] == methods()
    leaking = {r.name for r in report if r.leaks}
    assert leaking == {"augmented-centered", "linformer"}
    for r in report:
        assert (r.max_change > 1e-3) if r.leaks else r.max_change == 0.0
    assert [r.name for r in report if not r.causal_capable] == ["linformer"]


def test_subset_in_given_order():
    names = ["augmented-centered", "augmented"]
    assert [(n, leaks) for n, leaks, _ in leakage_report(names, seed=3)] == [(names[0], True), (names[1], False)]
