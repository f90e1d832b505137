"""The learned exit's per-boundary affine translator, its file format and its ONNX graph.

h' = h + (h / s)·W + b, with W, b zero at the start (so an untrained translator *is* the logit lens)
and s a fixed per-feature scale of the calibration hidden states. s only preconditions training: the
residual stream has a few features hundreds of times larger than the rest, and without it an Adam step
on their rows of W moves the output far more than a step on any other row. Folded, it is h + h·W' + b.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from safetensors.torch import load_file, save_file

from ..errors import MirrorDeployError


class AffineTranslator(torch.nn.Module):
    def __init__(self, hidden_size: int, input_scale: torch.Tensor | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size))
        scale = torch.ones(hidden_size) if input_scale is None else input_scale.detach().float().clone()
        self.register_buffer("input_scale", scale)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + (hidden / self.input_scale) @ self.weight + self.bias

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', b) with forward(h) == h + h @ W' + b."""
        return self.weight / self.input_scale[:, None], self.bias.clone()


class _FoldedGraph(torch.nn.Module):
    """What the exported graph computes: one MatMul and two Adds."""

    def __init__(self, translator: AffineTranslator):
        super().__init__()
        weight, bias = translator.folded()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, hidden_states):
        return hidden_states + hidden_states @ self.weight + self.bias


def export_onnx(translator: AffineTranslator, path: str | Path) -> Path:
    """`hidden_states [1, rows, d] -> adapted [1, rows, d]` (rows dynamic), for wiring into the exit head."""
    path = Path(path)
    d = translator.weight.shape[0]
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(scratch) / "translator.onnx"
        torch.onnx.export(_FoldedGraph(translator).eval(), (torch.randn(1, 3, d),), str(raw), dynamo=False,
                          opset_version=17, input_names=["hidden_states"], output_names=["adapted"],
                          dynamic_axes={"hidden_states": {1: "rows"}, "adapted": {1: "rows"}})
        onnx.checker.check_model(str(raw))
        raw.replace(path)
    return path


def save_translators(translators: dict[int, AffineTranslator], path: str | Path) -> Path:
    """One safetensors file; tensors named `boundary_<L>.<weight|bias|input_scale>`."""
    path = Path(path)
    tensors = {f"boundary_{b}.{name}": t.detach().contiguous()
               for b, tr in translators.items() for name, t in tr.state_dict().items()}
    save_file(tensors, str(path))
    return path


def load_translators(path: str | Path) -> dict[int, AffineTranslator]:
    path = Path(path)
    if not path.is_file():
        raise MirrorDeployError(f"translator file {path} does not exist",
                                "train one with `python -m mirror_deploy.tuning.lens MODEL_DIR --out DIR`")
    tensors = load_file(str(path))
    boundaries = sorted({int(name.split(".")[0].removeprefix("boundary_")) for name in tensors})
    translators = {}
    for b in boundaries:
        tr = AffineTranslator(tensors[f"boundary_{b}.bias"].shape[0])
        tr.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"boundary_{b}.")})
        translators[b] = tr.eval()
    return translators
