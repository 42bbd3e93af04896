"""Deployment exports of the two encoders: `torch.export` programs and ONNX graphs (+ preprocess JSON).

Only the model library is used here (no data/, eval/, train/); `onnx` / `onnxruntime` are the optional
`export` extra and are imported inside the functions that need them.
"""
from .torch_export import ImageEncoder, TextEncoder, encoder_modules, example_inputs, export_encoder, export_encoders

__all__ = ["ImageEncoder", "TextEncoder", "encoder_modules", "example_inputs", "export_encoder", "export_encoders"]
