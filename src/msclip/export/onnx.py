"""ONNX export of the two encoders (the dynamo exporter, from the `torch.export` programs) and the check
of the graphs against the torch model with ONNX Runtime.

`export_onnx(model, DIR)` writes `image_encoder.onnx`, `text_encoder.onnx` and `preprocess.json` (the
model folder's preprocessing description plus the graphs' input / output names, shapes and the trained
temperature). Shared trunk weights are stored in both graphs: each graph runs on its own.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import ExportedProgram

from .. import io
from ..errors import MsclipError
from ..model import MSCLIP
from ..pretrained_folder import PREPROCESS_NAME, preprocess_spec
from ..version import __version__
from .torch_export import INPUT_NAMES, KINDS, OUTPUT_NAME, export_encoders

log = logging.getLogger(__name__)
FILES = {"image": "image_encoder.onnx", "text": "text_encoder.onnx"}


class ExportError(MsclipError):
    """The export cannot run (a missing optional package) or cannot be written."""


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"ONNX export needs the optional packages onnx, onnxscript and onnxruntime "
                          f"(pip install 'msclip[export]'); {module} is not installed") from None


def _name_dims(proto: Any, names: dict[str, list[str | None]]) -> None:
    """Rename the exporter's symbolic dims (s34, s52, ...) to the readable names of the inputs."""
    rename = {}
    for value in proto.graph.input:
        for dim, name in zip(value.type.tensor_type.shape.dim, names.get(value.name, [])):
            if name and dim.dim_param:
                rename[dim.dim_param] = name
    for value in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def _graph_spec(model: MSCLIP, kind: str) -> dict[str, Any]:
    cfg = model.cfg
    if kind == "image":
        s = cfg.vision.image_size
        inp = {"name": INPUT_NAMES[kind], "shape": ["batch", 3, s, s], "dtype": "float32"}
    else:
        inp = {"name": INPUT_NAMES[kind], "shape": ["batch", "seq"], "dtype": "int64",
               "seq": f"1..{cfg.text.context_length} (tokens may be trimmed after the longest EOT)"}
    return {"file": FILES[kind], "input": inp,
            "output": {"name": OUTPUT_NAME, "shape": ["batch", cfg.embed_dim], "dtype": "float32",
                       "normalized": False}}


def export_onnx(model: MSCLIP, output_dir: str | os.PathLike, *, opset: int | None = None,
                programs: dict[str, ExportedProgram] | None = None) -> dict[str, Any]:
    """Write both encoders as ONNX graphs + preprocess.json into `output_dir`; returns the JSON written
    (with the seconds each step took under "seconds"). `programs`: `export_encoders(model)` if already made."""
    _require("onnx")
    _require("onnxscript")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"--output {output_dir} exists and is not a folder")
    model = model.float().eval()  # fp32 graphs: the runtimes' common ground
    t0 = time.perf_counter()
    programs = programs if programs is not None else export_encoders(model)
    seconds = {"torch_export": time.perf_counter() - t0}
    graphs, opsets, spec = {}, {}, {}

    def graph_writer(kind: str) -> Callable[[str], None]:
        def write(tmp: str) -> None:  # converted when its turn comes: one graph in memory at a time
            t = time.perf_counter()
            onnx_program = torch.onnx.export(programs[kind], (), dynamo=True, opset_version=opset,
                                             output_names=[OUTPUT_NAME], verbose=False)
            proto = onnx_program.model_proto
            _name_dims(proto, {"images": ["batch"], "tokens": ["batch", "seq"]})
            try:
                data = proto.SerializeToString()
            except ValueError as err:  # protobuf's 2 GB limit
                raise ExportError(f"the {kind} encoder graph is too large for one ONNX file: {err}") from None
            io.bytes_writer(data)(tmp)
            opsets[kind] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
            graphs[kind] = _graph_spec(model, kind)
            seconds[kind] = time.perf_counter() - t
            log.info("%s encoder -> %s (%.1f MB, %.1f s)", kind, output_dir / FILES[kind], len(data) / 1e6,
                     seconds[kind])
        return write

    def spec_writer(tmp: str) -> None:
        spec.update({"model": model.cfg.name, "format": "onnx", "msclip_version": __version__,
                     "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
                     "opset": opsets["image"], "graphs": graphs,
                     "logit_scale": math.exp(model.logit_scale.detach().item()),  # the trained temperature
                     **preprocess_spec(model.cfg)})
        io.json_writer(spec)(tmp)

    # The graphs and preprocess.json are written together: a failed export (a full disk, Ctrl-C) leaves an
    # earlier export in the folder whole, never a new image graph beside an old text graph.
    files = [(FILES[kind], graph_writer(kind)) for kind in KINDS] + [(PREPROCESS_NAME, spec_writer)]
    io.remove_stale_temporaries(output_dir, [name for name, _ in files])
    io.atomic_write_many([(output_dir / name, write) for name, write in files])
    return {**spec, "seconds": seconds}


def onnx_sessions(output_dir: str | os.PathLike, threads: int = 1) -> dict[str, Any]:
    """ONNX Runtime CPU sessions for the graphs in `output_dir`."""
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return {kind: ort.InferenceSession(str(Path(output_dir) / FILES[kind]), opts,
                                       providers=["CPUExecutionProvider"]) for kind in KINDS}


def run_onnx(sessions: dict[str, Any], kind: str, inputs: torch.Tensor | np.ndarray) -> np.ndarray:
    array = inputs.numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    return sessions[kind].run([OUTPUT_NAME], {INPUT_NAMES[kind]: array})[0]


@torch.no_grad()
def compare_with_onnxruntime(model: MSCLIP, output_dir: str | os.PathLike, images: torch.Tensor,
                             tokens: torch.Tensor) -> dict[str, float]:
    """Max abs difference of the unnormalised features, ONNX Runtime (CPU) vs the torch model."""
    sessions = onnx_sessions(output_dir)
    model = model.float().eval()
    ref = {"image": model.encode_image(images.float()), "text": model.encode_text(tokens, trim=False)}
    got = {"image": run_onnx(sessions, "image", images.float()), "text": run_onnx(sessions, "text", tokens)}
    return {kind: float(np.abs(got[kind] - ref[kind].numpy()).max()) for kind in KINDS}
