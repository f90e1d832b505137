"""The target's layer segments and head as OpenVINO-native graphs, built from the weights with OpenVINO's
own opset (the way fused_target.py writes ONNX Runtime's): the `openvino` target backend's fused target.

Each layer is RMSNorm, ONE packed QKV MatMul, rotary embeddings from cos/sin tables the model's own rotary
module computes, attention as ScaledDotProductAttention over K/V held as model state, o_proj, ONE packed
gate/up MatMul, SiLU·up, down_proj. The state is the pattern OpenVINO's CPU plugin fuses into one node with
its K/V cache (ReadValue → Gather(beam_idx) → Concat → SDPA, Assign; GQA as Unsqueeze → Broadcast →
Reshape): K/V are appended by the plugin, never passed in or out, and a rollback trims the state
(runtimes/kv.py, StateKV).

A window's rows compute the same bits as single steps (measured here, OpenVINO 2026.4 CPU, and tested):
the fused attention is row-invariant, and so are the weight formats chosen below. OpenVINO's compressed
MatMul is row-invariant only on its int8-activation path over symmetric codes (int4 in groups of 128 or
int8 per channel, DYNAMIC_QUANTIZATION_GROUP_SIZE 32); with float activations, or a zero point (GGUF's
Q4_K), a lone row takes another kernel. So int4 and int8 are symmetric here, and the runtime compiles these
graphs with int8 activations. `kernel`: int4 MatMuls through mirror-deploy's own kernel
(`mirror_deploy::Q4MatMul`, kernels/), row-invariant by construction.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import torch
from openvino import opset13 as ops
from openvino.op.util import Variable, VariableInfo

from ..runtimes.openvino import KERNEL_OP
from .shapes import TensorSpec

OV_WEIGHTS = ("fp32", "int8", "int4", "gguf")   # gguf: 4-bit blocks kept in our kernel (it is required then)
INT4_GROUP = 128


def ov_target_unsupported(config, weights: str) -> str | None:
    """Why this target cannot get OpenVINO-native segments (None when it can)."""
    from .fused_target import fused_unsupported
    why = fused_unsupported(config, 1)
    if why:
        return why
    if weights not in OV_WEIGHTS:
        return (f"--target-weights {weights} (OpenVINO-native segments take {', '.join(OV_WEIGHTS)}: the formats "
                "whose MatMul computes a row alike in a window and alone)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = config.num_attention_heads * head_dim
    widths = {config.hidden_size, config.intermediate_size, heads}
    if weights == "int4" and any(w % INT4_GROUP for w in widths):
        return f"int4 quantizes in groups of {INT4_GROUP} inputs, and this model has layers {sorted(widths)} wide"
    return None


def _dense(module) -> np.ndarray:
    """A projection's or token table's weight as float32 [N, K] (GGUF blocks dequantized as gguf-py does)."""
    for kept in ("mapped", "blocks"):
        if hasattr(module, kept):
            return getattr(module, kept).dequantize()
    return _array(module.weight)


def _array(t) -> np.ndarray:
    return t.detach().to(torch.float32).numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)


def _const(value, dtype=np.int64):
    return ops.constant(np.array(value, dtype))


class _Builder:
    """One graph being built: its weight format, and our kernel's node factory when it runs the int4 MatMuls."""

    def __init__(self, weights: str, kernel: bool):
        self.weights, self.kernel = weights, kernel
        self.factory = None
        if kernel:
            from openvino.utils.node_factory import NodeFactory
            from ..kernels.library import status
            self.factory = NodeFactory()
            self.factory.add_extension(str(status().path))

    def matmul(self, x, weight: np.ndarray, name: str):
        """x @ weightᵀ for weight [N, K], in the graph's weight format."""
        n, k = weight.shape
        if self.weights == "fp32":
            y = ops.matmul(x, ops.constant(np.ascontiguousarray(weight)), False, True)
        elif self.weights == "int4" and self.kernel:
            from ..kernels.layout import pack, quantize
            w = pack(*quantize(weight, INT4_GROUP), INT4_GROUP)
            inputs = [x, *(ops.constant(a) for a in (w.codes, w.scales, w.mins))]
            y = self.factory.create(KERNEL_OP, inputs, {"n": w.n, "k": w.k, "group": w.group})
        elif self.weights == "int4":
            y = ops.matmul(x, _int4_weight(weight), False, True)
        else:
            y = ops.matmul(x, _int8_weight(weight), False, True)
        y.set_friendly_name(name)
        return y.output(0)

    def gguf_matmul(self, x, mapped: list, name: str):
        """x @ Wᵀ for GGUF blocks (`gguf_weights.MappedWeight`), one node per run of one type: 4-bit types in our
        kernel with their own codes, each block's scale and minimum (as fp16: `kernels.layout.from_gguf`);
        the 5-, 6- and 8-bit ones dequantized and held as symmetric int8 per 32 inputs (row-invariant here)."""
        runs: list[list] = []
        for w in mapped:
            if runs and runs[-1][0].gguf_type == w.gguf_type:
                runs[-1].append(w)
            else:
                runs.append([w])
        outs = []
        for i, run in enumerate(runs):
            part = f"{name}.part{i}" if len(runs) > 1 else name
            if run[0].bits == 4:
                from ..kernels.layout import from_gguf
                w = from_gguf(run)
                inputs = [x, *(ops.constant(a) for a in (w.codes, w.scales, w.mins))]
                y = self.factory.create(KERNEL_OP, inputs, {"n": w.n, "k": w.k, "group": w.group})
            else:
                y = ops.matmul(x, _int8_weight(np.concatenate([w.dequantize() for w in run]), group=32), False, True)
            y.set_friendly_name(part)
            outs.append(y.output(0))
        return outs[0] if len(outs) == 1 else ops.concat(outs, -1).output(0)

    def linear(self, x, modules: list, name: str):
        """One MatMul for projections that read the same input (+ their biases)."""
        if self.weights == "gguf":
            y = self.gguf_matmul(x, [m.mapped for m in modules], name)
        else:
            y = self.matmul(x, np.concatenate([_dense(m) for m in modules]), name)
        if all(m.bias is not None for m in modules):
            y = ops.add(y, ops.constant(np.concatenate([_array(m.bias) for m in modules])))
        elif any(m.bias is not None for m in modules):
            raise ValueError(f"{name}: some packed projections have a bias and some do not")
        return y


def _int4_weight(w: np.ndarray):
    """Symmetric int4 in groups of 128 (as MatMulNBits' int4 and NNCF's INT4_SYM), in the plugin's
    decompression pattern: u4 codes → Convert → Subtract 8 → Multiply scale → Reshape."""
    n, k = w.shape
    g = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
    scale = np.abs(g).max(axis=-1, keepdims=True) / 7
    q = np.clip(np.rint(g / np.where(scale == 0, 1, scale)), -8, 7).astype(np.int16) + 8
    codes = ops.convert(ops.constant(q.astype(np.uint8), dtype=ov.Type.u4), ov.Type.f32)
    codes = ops.subtract(codes, ops.convert(ops.constant(np.uint8(8), dtype=ov.Type.u4), ov.Type.f32))
    return ops.reshape(ops.multiply(codes, ops.constant(scale.astype(np.float32))), _const([n, k]), False)


def _int8_weight(w: np.ndarray, group: int | None = None, name: str | None = None):
    """Symmetric int8 per output channel (or per `group` inputs): i8 codes → Convert → Multiply scale. `name`
    names the constants (bench's bytes-streamed leaves out the token table by its name)."""
    n, k = w.shape
    g = w.reshape(n, 1 if group is None else k // group, -1)
    scale = np.abs(g).max(axis=-1, keepdims=True) / 127
    q = np.clip(np.rint(g / np.where(scale == 0, 1, scale)), -127, 127).astype(np.int8)
    codes, scales = ops.constant(q), ops.constant(scale.astype(np.float32))
    if name:
        codes.set_friendly_name(f"{name}.codes")
        scales.set_friendly_name(f"{name}.scales")
    w = ops.multiply(ops.convert(codes, ov.Type.f32), scales)
    return ops.reshape(w, _const([n, k]), False)


def _rms_norm(x, norm):
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    mean = ops.reduce_mean(ops.multiply(x, x), _const([-1]), True)
    scaled = ops.multiply(x, ops.divide(_const(1.0, np.float32), ops.sqrt(ops.add(mean, _const(eps, np.float32)))))
    return ops.multiply(scaled, ops.constant(_array(norm.weight)))


def _rotary_tables(model, arch, capacity: int):
    """cos/sin [capacity, hd] from the model's own rotary module (its scaling included)."""
    with torch.no_grad():
        cos, sin = arch.position_embeddings(model, torch.zeros(1, dtype=torch.float32), torch.arange(capacity)[None])
    return ops.constant(_array(cos[0])), ops.constant(_array(sin[0]))


def _rotate(x, cos, sin, hd: int):
    """x·cos + rotate_half(x)·sin on head-major [1, heads, seq, hd] (cos/sin [1, 1, seq, hd]). The halves are
    Slices, as HF's rotate_half writes them: the CPU plugin then fuses the whole rotation into one RoPE node
    (a Split there was left as reference Split/Concat nodes: 5% of a 4-layer segment at 1 row, 2 threads)."""
    half = hd // 2
    first = ops.slice(x, _const([0]), _const([half]), _const([1]), _const([3]))
    second = ops.slice(x, _const([half]), _const([hd]), _const([1]), _const([3]))
    rotated = ops.concat([ops.negative(second), first], -1)
    return ops.add(ops.multiply(x, cos), ops.multiply(rotated, sin))


def _heads(x, heads: int, hd: int):
    """[1, seq, heads·hd] -> [1, heads, seq, hd]"""
    return ops.transpose(ops.reshape(x, _const([0, 0, heads, hd]), True), _const([0, 2, 1, 3]))


def _cached(new, name: str, kv: int, hd: int, beam, sinks: list):
    """K or V over past ⊕ new, the past held as state `name` (initially empty)."""
    info = VariableInfo()
    info.data_shape, info.data_type, info.variable_id = ov.PartialShape([1, kv, -1, hd]), ov.Type.f32, name
    variable = Variable(info)
    empty = ops.broadcast(_const(0.0, np.float32), _const([1, kv, 0, hd]))
    past = ops.gather(ops.read_value(empty, variable), beam, _const(0))
    both = ops.concat([past, new], 2)
    sinks.append(ops.assign(both, variable))
    return both


def _grouped(kv_all, kv: int, group: int, hd: int):
    """[1, kv, T, hd] -> [1, kv·group, T, hd]: the GQA broadcast the plugin's fused attention recognises."""
    if group == 1:
        return kv_all
    spread = ops.broadcast(ops.unsqueeze(kv_all, _const([2])), _const([1, 1, group, 1, 1]), broadcast_spec="BIDIRECTIONAL")
    return ops.reshape(spread, _const([1, kv * group, -1, hd]), False)


def _attention(b: _Builder, x, attn, i: int, shape, rope, mask, beam, sinks: list):
    h, kv, hd = shape.num_heads, shape.kv_heads, shape.head_dim
    name = f"layers.{i}.attn"
    qkv = b.linear(x, [attn.q_proj, attn.k_proj, attn.v_proj], f"{name}.qkv_proj")
    q, k, v = ops.variadic_split(qkv, _const(-1), _const([h * hd, kv * hd, kv * hd])).outputs()
    q, k, v = _heads(q, h, hd), _heads(k, kv, hd), _heads(v, kv, hd)
    if hasattr(attn, "q_norm"):   # qwen3: q/k normed per head before the rotary embedding
        q, k = _rms_norm(q, attn.q_norm), _rms_norm(k, attn.k_norm)
    q, k = _rotate(q, *rope, hd), _rotate(k, *rope, hd)
    keys = _grouped(_cached(k, f"past_key.{i}", kv, hd, beam, sinks), kv, h // kv, hd)
    values = _grouped(_cached(v, f"past_value.{i}", kv, hd, beam, sinks), kv, h // kv, hd)
    scale = float(getattr(attn, "scaling", hd ** -0.5))
    out = ops.scaled_dot_product_attention(q, keys, values, mask, _const(scale, np.float32), causal=False)
    out = ops.reshape(ops.transpose(out, _const([0, 2, 1, 3])), _const([0, 0, h * hd]), True)
    return b.linear(out, [attn.o_proj], f"{name}.o_proj")


def _mlp(b: _Builder, x, mlp, i: int):
    gate, up = ops.split(b.linear(x, [mlp.gate_proj, mlp.up_proj], f"layers.{i}.mlp.gate_up_proj"), _const(-1), 2).outputs()
    return b.linear(ops.multiply(ops.swish(gate), up), [mlp.down_proj], f"layers.{i}.mlp.down_proj")


def _parameter(spec: TensorSpec):
    dims = [d if isinstance(d, int) else -1 for d in spec.shape]
    p = ops.parameter(dims, np.dtype(spec.dtype), name=spec.name)
    p.output(0).set_names({spec.name})
    return p


def segment_io(shape, layers: range) -> list[TensorSpec]:
    first = (TensorSpec("input_ids", "int64", (1, "seq")) if layers.start == 0
             else TensorSpec("hidden_states", "float32", (1, "seq", shape.hidden_size)))
    return [first, TensorSpec("position_ids", "int64", (1, "seq")),
            TensorSpec("attention_mask", "float32", (1, 1, "seq", "past+seq")), TensorSpec("beam_idx", "int32", (1,))]


def build_ov_segment(model, arch, shape, layers: range, capacity: int, weights: str, kernel: bool) -> ov.Model:
    """Layers [start, stop) of the target as one stateful OpenVINO model (K/V as state past_key.i /
    past_value.i); `kernel`: int4 MatMuls through our Q4MatMul."""
    b = _Builder(weights, kernel)
    params = [_parameter(s) for s in segment_io(shape, layers)]
    first, positions, mask, beam = params
    if layers.start == 0:
        table = _dense(arch.decoder_of(model).get_submodule(arch.embed))
        hidden = ops.gather(_token_table(table, weights), first, _const(0))
    else:
        hidden = first
    cos_table, sin_table = _rotary_tables(model, arch, capacity)
    rope = tuple(ops.unsqueeze(ops.gather(t, positions, _const(0)), _const([1])) for t in (cos_table, sin_table))
    sinks: list = []
    for i in layers:
        layer = arch.layers_of(model)[i]
        hidden = ops.add(hidden, _attention(b, _rms_norm(hidden, layer.input_layernorm), layer.self_attn, i, shape,
                                            rope, mask, beam, sinks))
        hidden = ops.add(hidden, _mlp(b, _rms_norm(hidden, layer.post_attention_layernorm), layer.mlp, i))
    out = ops.result(hidden)
    out.output(0).set_names({"hidden_out"})
    out.get_input_tensor(0).set_names({"hidden_out"})
    return ov.Model([out], sinks, params, f"target_layers_{layers.start}_{layers.stop}")


def _token_table(table: np.ndarray, weights: str):
    """fp32 rows, or int8 rows with a scale each for a quantized target (as the ONNX Runtime target's)."""
    if weights == "fp32":
        out = ops.constant(table)
        out.set_friendly_name("embed_tokens.weight")
        return out
    return _int8_weight(table, name="embed_tokens")   # per row: the plugin gathers it compressed


def build_ov_head(model, arch, shape, kappa: int, weights: str, kernel: bool) -> ov.Model:
    """Final norm + LM head + top-κ log-probs; same inputs and outputs as the traced head."""
    b = _Builder(weights, kernel)
    hidden = _parameter(TensorSpec("hidden_states", "float32", (1, "rows", shape.hidden_size)))
    logits = b.linear(_rms_norm(hidden, arch.final_norm_of(model)), [model.lm_head], "lm_head")
    top = ops.topk(ops.log_softmax(logits, -1), _const(kappa), -1, "max", "value", ov.Type.i64)
    results = []
    for name, value in (("logits", logits), ("top_ids", top.output(1)), ("top_logprobs", top.output(0))):
        r = ops.result(value)
        r.output(0).set_names({name})
        r.get_input_tensor(0).set_names({name})
        results.append(r)
    return ov.Model(results, [hidden], "target_head")


def save_ov(model: ov.Model, path: Path) -> Path:
    xml = path.with_suffix(".xml")
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml
