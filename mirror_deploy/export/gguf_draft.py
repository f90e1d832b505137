"""The stateful OpenVINO draft from its GGUF with no dense copy of its weights (`--draft-weights gguf`).

Tracing the fp32 draft with its weights was the export's peak: torch's TorchScript exporter holds them
two and three times over (5.5 GB for the 0.5B; docs/results/gguf-table-and-draft.md, section 5). Here the
module is built on the meta device and its weights enter the trace as graph inputs, backed by untouched
memory: the trace holds no weight data. OpenVINO then replaces each weight input, by name, with its GGUF
tensor: quantized ones as their blocks in the CPU plugin's decompression pattern (openvino_gguf.decompressed),
dense ones (norms, biases) as constants. The graph is the one the traced route builds, so runs and
`check` see no difference.

A pulled folder's checkpoint is compared with the GGUF tensor by tensor, read from its safetensors by
offset (nothing of it stays resident): a checkpoint that is not this GGUF's dequantization is refused,
as the value-matching route refuses it.
"""
from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import openvino as ov
import torch
from openvino import opset13 as ops

from ..errors import MirrorDeployError
from .gguf_model import GGUF_MODEL_TYPES, _PERMUTED_QK, _read, _rebuild_rotary
from .gguf_weights import DENSE, MAPPERS, read_blocks
from .graphs import StatefulDraft
from .openvino_gguf import NAME_PREFIX, decompressed, rewire, unmappable
from .shapes import draft_top_m, dynamic_axes, graph_io

WEIGHT_INPUT = "weight:"   # a weight traced as a graph input: weight:<HF parameter name>


def applies(draft) -> bool:
    """The weights-free route: an architecture whose GGUF rows are HF's (q/k not permuted), and a source
    whose tensors can be read one at a time (the .gguf itself, or safetensors)."""
    model_type = draft.config.model_type
    if model_type not in GGUF_MODEL_TYPES or model_type in _PERMUTED_QK:
        return False
    return draft.path.suffix == ".gguf" or bool(_safetensors_files(draft.path))


def _meta_draft(draft):
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(draft.config, dtype=torch.float32, attn_implementation="eager")
    _rebuild_rotary(model, draft.config)
    return model


def trace_weightless(scratch: Path, draft) -> tuple[Path, dict[str, str]]:
    """The stateful draft traced to `scratch`/graph.onnx with every weight a graph input; returns the file
    and {input name: HF parameter name}."""
    from .onnx_export import example_inputs
    model = _meta_draft(draft)
    layers = range(draft.shape.num_layers)
    module = StatefulDraft(draft.arch, model, 0, layers.stop, draft_top_m(draft.shape)).eval()
    params = dict(module.named_parameters())        # a tied head is one parameter (the table)
    prefix = "model."                               # StatefulDraft holds the causal LM as .model
    inputs, outputs = graph_io("draft_stateful", draft.shape, layers)
    names = list(params)
    index = {id(p): i for i, p in enumerate(params.values())}
    slots = [(module.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2], index[id(p)])
             for n, p in module.named_parameters(remove_duplicate=False)]   # both names of a tied weight
    n_io = len(inputs)

    class WeightsIn(torch.nn.Module):
        """The draft with each weight taken from its graph input (torch.func cannot be traced)."""
        def forward(self, *args):
            for owner, attr, i in slots:
                owner._parameters.pop(attr, None)
                setattr(owner, attr, args[n_io + i])
            return module(*args[:n_io])

    # torch.empty: fresh pages the trace only reads, so they stay unallocated (the zero page)
    weights = tuple(torch.empty(p.shape, dtype=torch.float32) for p in params.values())
    weight_inputs = [WEIGHT_INPUT + n[len(prefix):] for n in names]
    raw = Path(scratch) / "graph.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(WeightsIn(), (*example_inputs(inputs, draft.shape), *weights), str(raw), dynamo=False,
                          opset_version=17, do_constant_folding=True,
                          input_names=[s.name for s in inputs] + weight_inputs,
                          output_names=[s.name for s in outputs], dynamic_axes=dynamic_axes([*inputs, *outputs]))
    return raw, {w: n[len(prefix):] for w, n in zip(weight_inputs, names)}


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


class Checkpoint:
    """A safetensors checkpoint read one tensor at a time, by offset (not mapped)."""

    _DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}

    def __init__(self, folder: Path):
        self.where: dict[str, tuple[Path, dict, int]] = {}
        for path in _safetensors_files(folder):
            with open(path, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    self.where[name] = (path, info, 8 + size)

    def get(self, name: str) -> np.ndarray | None:
        if name not in self.where:
            return None
        path, info, base = self.where[name]
        dtype = self._DTYPES.get(info["dtype"])
        if dtype is None:
            return None          # bf16 or another type: not an fp32 dequantization, so never equal
        begin, end = info["data_offsets"]
        with open(path, "rb") as f:
            f.seek(base + begin)
            data = np.frombuffer(f.read(end - begin), dtype)
        return data.reshape(info["shape"]).astype(np.float32, copy=False)


def keep_gguf_weights(model: ov.Model, weight_names: dict[str, str], gguf_file: Path, draft) -> ov.Model:
    """Replace each weight input of `model` with its tensor of `gguf_file`; edits `model` in place."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    tensors = {t.name: t for t in GGUFReader(gguf_file).tensors}
    by_hf = {hf: tensors[g] for g, hf in get_gguf_hf_weights_map(_meta_draft(draft)).items() if g in tensors}
    if "lm_head.weight" not in by_hf and "token_embd.weight" in tensors:   # a tied head: stored once
        by_hf["lm_head.weight"] = tensors["token_embd.weight"]
    checkpoint = Checkpoint(draft.path) if draft.path.suffix != ".gguf" else None
    for param in list(model.get_parameters()):
        name = param.get_output_tensor(0).get_any_name()
        if not name.startswith(WEIGHT_INPUT):
            continue
        hf = weight_names[name]
        tensor = by_hf.get(hf)
        if tensor is None:
            raise MirrorDeployError(f"{gguf_file.name} has no tensor for the draft's {hf}",
                                    "give the draft's complete GGUF model file")
        shape = tuple(int(d) for d in param.get_output_partial_shape(0).to_shape())
        if tuple(int(d) for d in reversed(tensor.shape)) != shape:
            raise _not_its_gguf(f"the draft's {hf} is {list(shape)}, its tensor {tensor.name} in {gguf_file.name} is "
                                f"{[int(d) for d in reversed(tensor.shape)]}")
        weight, dense = _gguf_weight(gguf_file, tensor, shape)
        if checkpoint is not None:
            _same_as_checkpoint(checkpoint, hf, dense(), gguf_file)
        _take_weight(param.output(0), weight)
        model.remove_parameter(param)
    model.validate_nodes_and_infer_types()
    # The conversion's own passes (ScaledDotProductAttention fusion among them) could not match with the
    # weights as inputs: they run again now that the weights are constants, without constant folding so
    # the blocks keep their decompression pattern. The IR then equals the traced route's, op for op.
    from openvino._offline_transformations import apply_moc_transformations
    apply_moc_transformations(model, False)
    return model


def _gguf_weight(gguf_file: Path, tensor, shape: tuple[int, ...]) -> tuple[ov.Output, Callable[[], np.ndarray]]:
    """The graph's weight for `tensor`, and its dense value on demand (for a checkpoint comparison only)."""
    kind = tensor.tensor_type.name
    if kind in DENSE:
        dense = np.asarray(_read(gguf_file, tensor), dtype=np.float32).reshape(shape)
        return ops.constant(dense).output(0), lambda: dense
    if kind not in MAPPERS or len(shape) != 2:
        raise unmappable(tensor.name, kind, gguf_file)
    blocks = read_blocks(_read(gguf_file, tensor), kind, shape, tensor.name)
    weight = decompressed(blocks)
    weight.get_node().set_friendly_name(NAME_PREFIX + tensor.name)
    return weight, blocks.dequantize


def _same_as_checkpoint(checkpoint: Checkpoint, hf: str, dense: np.ndarray, gguf_file: Path) -> None:
    value = checkpoint.get(hf)
    if value is None and hf == "lm_head.weight":
        value = checkpoint.get("model.embed_tokens.weight")
    if value is None or value.shape != dense.shape or not np.array_equal(value, dense):
        raise _not_its_gguf(f"the draft's checkpoint {hf} is not equal to its tensor in {gguf_file.name}")


def _not_its_gguf(what: str) -> MirrorDeployError:
    return MirrorDeployError(f"{what}: its checkpoint is not this GGUF's dequantization",
                             "export the draft from the .gguf file itself or from the folder `mirror-deploy models "
                             "pull` made of it")


def _take_weight(source: ov.Output, weight: ov.Output) -> None:
    """Every use of a weight input takes `weight`. A projection, traced as MatMul(x, Transpose(W)), becomes
    MatMul(x, W, transpose_b) (openvino_gguf.rewire): the pattern the CPU plugin multiplies compressed."""
    for use in list(source.get_target_inputs()):
        node = use.get_node()
        matmuls = [u.get_node() for u in node.output(0).get_target_inputs()] if node.get_type_name() == "Transpose" else []
        order = node.input_value(1).get_node() if matmuls else None
        if (matmuls and order.get_type_name() == "Constant" and list(order.get_data()) == [1, 0]
                and all(m.get_type_name() == "MatMul" and m.input_value(1).get_node() is node
                        and not m.get_attributes().get("transpose_b") for m in matmuls)):
            for matmul in matmuls:
                rewire(matmul, 1, True, weight)
            continue
        use.replace_source_output(weight)
