"""`lincompile kernels`: the listing names every method's generated forms or why the reference serves it, and
`--print-source` prints a self-contained kernel (constants, helpers it calls, the kernel)."""
import argparse
import ast
import json

import pytest

from lincompile.cli import kernels_cmd
from lincompile.methods.spec import methods


def _run(argv, capsys):
    parser = argparse.ArgumentParser(prog="lincompile")
    kernels_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["kernels", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_listing(capsys):
    rows = json.loads(_run(["--json"], capsys))
    assert [r["method"] for r in rows] == methods()
    by_name = {r["method"]: r for r in rows}
    assert by_name["augmented"]["generated"] == ["chunked_fwd", "parallel_fwd", "recurrent", "verify", "chunked_bwd",
                                                 "parallel_bwd"]
    assert by_name["retnet"]["generated"] == ["chunked_fwd", "recurrent", "verify", "chunked_bwd"]
    assert by_name["softmax"]["generated"] == [] and "kind='softmax'" in by_name["softmax"]["reference"]
    assert "augmented" in _run([], capsys)


@pytest.mark.parametrize("form,kernel", [("chunked_fwd", "chunked_fwd"), ("recurrent", "recurrent"),
                                         ("verify", "verify_fwd")])
def test_print_source(form, kernel, capsys):
    source = _run(["--print-source", "augmented", "--form", form, "--head-dim", "128"], capsys)
    tree = ast.parse(source)
    names = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert names[-1] == kernel and "_phi" in names
    assert "DK = tl.constexpr(128)" in source and "HALF = tl.constexpr(31)" in source
    assert all(other not in names for other in {"chunked_fwd", "recurrent", "verify_fwd"} - {kernel})


def test_print_backward_source(capsys):
    source = _run(["--print-source", "augmented", "--form", "chunked_bwd", "--head-dim", "128"], capsys)
    names = [node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]
    assert names[-2:] == ["bwd_dq", "bwd_dkv"] and {"_phi", "_dphi", "_chunk"} <= set(names)
    assert "BV = tl.constexpr(128)" in source


def test_print_parallel_sources(capsys):
    forward = _run(["--print-source", "augmented", "--form", "parallel_fwd"], capsys)
    assert [n.name for n in ast.parse(forward).body if isinstance(n, ast.FunctionDef)][-2:] == ["chunk_sums",
                                                                                              "chunk_outputs"]
    backward = _run(["--print-source", "hedgehog", "--form", "parallel_bwd"], capsys)
    names = [n.name for n in ast.parse(backward).body if isinstance(n, ast.FunctionDef)]
    assert names[-2:] == ["bwd_dq_chunks", "bwd_dkv_chunks"] and "bwd_dq" not in names


def test_decay_has_no_parallel_form():
    with pytest.raises(ValueError, match="retnet decays its state, so it has no parallel_bwd kernels"):
        kernels_cmd.kernel_source("retnet", "parallel_bwd")


def test_unknown_form_is_named():
    with pytest.raises(ValueError, match="unknown form 'chunked_bwdx'"):
        kernels_cmd.kernel_source("augmented", "chunked_bwdx")


def test_print_source_as_json_is_the_same_source(capsys):
    plain = _run(["--print-source", "augmented", "--form", "recurrent"], capsys)
    data = json.loads(_run(["--print-source", "augmented", "--form", "recurrent", "--json"], capsys))
    assert data["source"] == plain and (data["head_dim"], data["v_head_dim"], data["dtype"]) == (64, 64, "float32")


@pytest.mark.parametrize("option", ["--head-dim", "--v-head-dim"])
def test_impossible_head_dims_are_refused(option, capsys):
    with pytest.raises(SystemExit):
        _run(["--print-source", "augmented", option, "0"], capsys)
    assert "must be >= 1, got 0" in capsys.readouterr().err


def test_shape_options_without_print_source_are_refused(capsys):
    with pytest.raises(ValueError, match="--head-dim, --dtype choose the kernel --print-source prints"):
        _run(["--head-dim", "128", "--dtype", "bfloat16"], capsys)
