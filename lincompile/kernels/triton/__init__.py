"""Triton kernels generated from a `MethodSpec` (see `codegen` for what is covered)."""
