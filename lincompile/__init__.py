"""lincompile: compile pretrained softmax-attention transformers into linearized models.

Public surface: `optimize`, `inspect`, `load`, `load_model`, `methods`, `export_onnx`, `OrtModel`, the
config classes, `LincompileWarning` (the category of its warnings) and `pretrained` (shipped trained
linearizations: `pretrained.linearized(model, method)`).
"""
from lincompile.kernels import ops as _ops  # noqa: F401  (registers lincompile::attention)
from lincompile.api import example_inputs, inspect, load, optimize
from lincompile.assets import load_model
from lincompile.backends.eager import LinearizedModel
from lincompile.backends.onnx import export_onnx
from lincompile.backends.ort import OrtModel
from lincompile.config import LinearizeConfig
from lincompile.diagnostics import LincompileWarning
from lincompile.methods.spec import MethodSpec, get_method, methods
from lincompile.runtime.state import RecurrentState
from lincompile import pretrained

__version__ = "0.1.0"

__all__ = [
    "LincompileWarning", "LinearizeConfig", "LinearizedModel", "MethodSpec", "OrtModel", "RecurrentState",
    "example_inputs",
    "export_onnx", "get_method",
    "inspect", "load", "load_model", "methods", "optimize", "pretrained",
]
