"""User model formats: ONNX files and `torch.export` programs as editable `nn.Module`s.

`load_onnx` / `write_onnx` (our own ONNX -> torch.fx converter; repaired weights are patched into the
original file's initializers) and `load_pt2` / `write_pt2` (ExportedProgram -> GraphModule with real
nn.Conv2d / nn.Linear / nn.ReLU modules under the user's names; repaired weights saved back by FQN).
"""
from .export_model import Pt2Source, load_pt2, write_pt2
from .onnx_model import SUPPORTED_OPS, OnnxSource, load_onnx, onnx_layers, write_onnx

__all__ = ["OnnxSource", "Pt2Source", "SUPPORTED_OPS", "load_onnx", "load_pt2", "onnx_layers", "write_onnx", "write_pt2"]
