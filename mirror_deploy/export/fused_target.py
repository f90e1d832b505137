"""The target's layer segments as fused ONNX Runtime graphs, built directly from the HF weights.

Written node by node with onnx.helper and numpy, the way onnxruntime-genai's model builder does, instead
of tracing the HF layers: each layer is (Skip)SimplifiedLayerNormalization, ONE packed QKV MatMul, rotary
embeddings (`com.microsoft::RotaryEmbedding`, from cos/sin caches the model's own rotary module computes,
so rope scaling matches), the K/V write, attention, o_proj, ONE packed gate/up MatMul, SiLU·up, down_proj.

K/V are head-major `[1, kv, slots, hd]`: the runtime binds one buffer per layer as both past_key.i and
present_key.i, sized to the call's attention span (`axes.attention_slots`), and `TensorScatter` writes the
window's K/V into it in place (no copy); a rollback is a smaller length. Attention is written so a row
computes the same bits in a verify window as alone (`_invariant_attention`, axes.py), with its causal mask
built from position_ids. (ORT's GroupQueryAttention, used before, computes a lone row another way; with the
runtime's even-row calls it is row-invariant too, but reads the K/V once per query head, which loses at long
contexts: docs/results/memory-limit-step.md, section 6. seqlens_k and total_sequence_length stay inputs for
runtimes that feed them, unused.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..axes import SEQ
from .fused_embedding import embedding
from .shapes import TensorSpec, kv_names

FUSED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
OPSET = 24   # TensorScatter: the in-place K/V write
KV_CAPACITY = "capacity"       # axis name of the bound K/V buffers (the artifact's max_context)
_EXTERNAL_DATA_BYTES = 64 << 20  # above this the weights stream to a side file as written: inline, a graph
#                                  holds each weight three times at once (array, proto, serialized; protobuf caps 2 GiB)
_UNSCALED_ROPE = ("dynamic", "longrope")  # cos/sin depend on the sequence length: not a fixed cache


def fused_unsupported(config, max_context: int) -> str | None:
    """Why this target cannot get fused segments (None when it can)."""
    if config.model_type not in FUSED_MODEL_TYPES:
        return f"model type {config.model_type!r} has no fused builder (only {', '.join(FUSED_MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (the fused MLP is SiLU-gated)"
    rope = (getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type")) in _UNSCALED_ROPE:
        return f"rope type {rope.get('rope_type', rope.get('type'))!r} varies with the sequence length"
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or []) or (
        config.model_type == "mistral" and window is not None)
    if sliding and window is not None and window < max_context:
        return f"sliding-window attention ({window}) inside the {max_context}-position capacity"
    return None


def fused_segment_io(shape, layers: range) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of a fused segment: the K/V buffers come in as past and go out as present
    (the same memory, bound by the runtime)."""
    kv = (1, shape.kv_heads, KV_CAPACITY, shape.head_dim)
    first = (TensorSpec("input_ids", "int64", (1, SEQ)) if layers.start == 0
             else TensorSpec("hidden_states", "float32", (1, SEQ, shape.hidden_size)))
    inputs = [first, TensorSpec("position_ids", "int64", (1, SEQ)),
              TensorSpec("seqlens_k", "int32", (1,)), TensorSpec("total_sequence_length", "int32", ()),
              *(TensorSpec(n, "float32", kv) for n in kv_names("past", layers))]
    outputs = [TensorSpec("hidden_out", "float32", (1, SEQ, shape.hidden_size)),
               *(TensorSpec(n, "float32", kv) for n in kv_names("present", layers))]
    return inputs, outputs


class _Graph:
    """Nodes and initializers being written; every node gets a unique name (the quantizer excludes by name)."""

    def __init__(self, side_file: Path | None = None):
        self.nodes, self.weights = [], []
        self.shared: dict = {}   # values computed once per graph and read by every layer
        # Large segments stream each weight to the side file as it is made, so the process never holds
        # the segment a second time as protobuf bytes (the export's peak memory).
        self.side_file = side_file
        self.sink = open(side_file, "wb") if side_file else None

    def weight(self, name: str, array) -> str:
        if isinstance(array, torch.Tensor):
            array = array.detach().to(torch.float32).numpy()
        array = np.asarray(array)
        array = array if array.flags.c_contiguous else np.ascontiguousarray(array)  # (which makes 0-d 1-d)
        if self.sink is None or array.nbytes < 1024:
            self.weights.append(numpy_helper.from_array(array, name))
            return name
        self.sink.seek(-self.sink.tell() % 4096, 1)        # page-aligned, so runtimes can map it
        offset = self.sink.tell()
        self.sink.write(memoryview(array).cast("B"))
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                             dims=array.shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.side_file.name), ("offset", offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        self.weights.append(tensor)
        return name

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1,
             domain: str = "", **attrs) -> list[str]:
        outs = outputs if isinstance(outputs, list) else [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        return self.node(op, inputs, name, **attrs)[0]


def _linear(g: _Graph, x: str, modules: list, name: str) -> str:
    """x @ [W_1; W_2; ...]ᵀ (+ bias): one MatMul for several projections that read the same input."""
    if hasattr(modules[0], "mapped"):
        y = _quant_linear(g, x, [m.mapped for m in modules], name)
    else:
        weight = torch.cat([m.weight for m in modules]).T
        y = g.one("MatMul", [x, g.weight(f"{name}.weight", weight)], f"{name}/MatMul")
    if all(m.bias is not None for m in modules):
        y = g.one("Add", [y, g.weight(f"{name}.bias", torch.cat([m.bias for m in modules]))], f"{name}/Add")
    elif any(m.bias is not None for m in modules):
        raise ValueError(f"{name}: some packed projections have a bias and some do not")
    return y


def _quant_linear(g: _Graph, x: str, weights: list, name: str) -> str:
    """GGUF-quantized projections (`gguf_weights.MappedWeight`): one MatMulNBits per run of projections
    with the same bits and block, concatenated when the file mixes types (Q4_K q/k beside a Q6_K v)."""
    runs: list[list] = []
    for w in weights:
        if runs and _run_key(runs[-1][0]) == _run_key(w):
            runs[-1].append(w)
        else:
            runs.append([w])
    outs = [_matmul_nbits(g, x, run, f"{name}.part{i}" if len(runs) > 1 else name) for i, run in enumerate(runs)]
    return outs[0] if len(outs) == 1 else g.one("Concat", outs, f"{name}/Concat", axis=-1)


def _run_key(w) -> tuple:
    return w.bits, w.block, w.offsets is not None


def _matmul_nbits(g: _Graph, x: str, run: list, name: str) -> str:
    """x @ Wᵀ for W = scale·(q − center) (+ offset per block). The offset goes through a small fp32 MatMul
    of the input's block sums: MatMulNBits' float zero point is a slow generic kernel in ORT 1.23."""
    bits, block, k = run[0].bits, run[0].block, run[0].shape[1]
    n = sum(w.shape[0] for w in run)
    packed = np.concatenate([w.packed for w in run])
    scales = np.concatenate([w.scales for w in run]).reshape(-1)
    y = g.one("MatMulNBits", [x, g.weight(f"{name}.qweight", packed), g.weight(f"{name}.scales", scales)],
              f"{name}/MatMulNBits", domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
              accuracy_level=4)
    if run[0].offsets is None:
        return y
    blocks = g.one("Reshape", [x, g.weight(f"{name}.blocks", np.array([0, 0, k // block, block], np.int64))],
                   f"{name}/Blocks")
    sums = g.one("ReduceSum", [blocks, g.weight(f"{name}.axis", np.array([-1], np.int64))], f"{name}/BlockSums",
                 keepdims=0)
    offsets = np.ascontiguousarray(np.concatenate([w.offsets for w in run]).T)   # [K / block, N]
    shift = g.one("MatMul", [sums, g.weight(f"{name}.offsets", offsets)], f"{name}/Offsets")
    return g.one("Add", [y, shift], f"{name}/AddOffsets")


def build_fused_head(model, arch, shape, kappa: int, path: Path) -> Path:
    """Final norm + LM head + top-κ log-probs, written like the segments (for a GGUF target, whose head is a
    `QuantLinear` that the traced TargetHead cannot carry). Same inputs and outputs as the traced head."""
    from .shapes import graph_io
    inputs, outputs = graph_io("target_head", shape, range(0, 0), kappa)
    norm = arch.final_norm_of(model)
    external = model.lm_head.mapped.nbytes > _EXTERNAL_DATA_BYTES
    g = _Graph(path.with_name(path.name + ".data") if external else None)
    try:
        x = g.one("SimplifiedLayerNormalization", ["hidden_states", g.weight("norm.weight", norm.weight)], "norm",
                  axis=-1, epsilon=_norm_eps(norm), stash_type=1)
        logits = _linear(g, x, [model.lm_head], "lm_head")
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits/Identity"))
        logprobs = g.one("LogSoftmax", [logits], "LogSoftmax", axis=-1)
        g.node("TopK", [logprobs, g.weight("kappa", np.array([kappa], np.int64))], "TopK",
               ["top_logprobs", "top_ids"], axis=-1)
    finally:
        g.close()
    return _save(g, "target_head", inputs, outputs, path)


def _norm_eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _head_norm(g: _Graph, x: str, norm, heads: int, hd: int, name: str) -> str:
    """Qwen3's per-head RMSNorm of q or k, before the rotary embedding GQA applies."""
    split = g.one("Reshape", [x, g.weight(f"{name}.shape", np.array([0, 0, heads, hd], np.int64))], f"{name}/Split")
    normed = g.one("SimplifiedLayerNormalization", [split, g.weight(f"{name}.weight", norm.weight)], name,
                   axis=-1, epsilon=_norm_eps(norm), stash_type=1)
    return g.one("Reshape", [normed, g.weight(f"{name}.flat", np.array([0, 0, heads * hd], np.int64))],
                 f"{name}/Merge")


def _attention(g: _Graph, x: str, attn, i: int, shape, rotary: tuple[str, str]) -> str:
    h, kv, hd = shape.num_heads, shape.kv_heads, shape.head_dim
    name = f"layers.{i}.attn"
    qkv = _linear(g, x, [attn.q_proj, attn.k_proj, attn.v_proj], f"{name}.qkv_proj")
    q, k, v = g.node("Split", [qkv, g.weight(f"{name}.split", np.array([h * hd, kv * hd, kv * hd], np.int64))],
                     f"{name}/SplitQKV", 3, axis=-1)
    if hasattr(attn, "q_norm"):   # qwen3: q/k are normed per head before the rotary embedding
        q, k = _head_norm(g, q, attn.q_norm, h, hd, f"{name}.q_norm"), _head_norm(g, k, attn.k_norm, kv, hd,
                                                                                  f"{name}.k_norm")
    _append_kv(g, k, v, i, kv, hd, rotary, name)
    out = _invariant_attention(g, q, i, shape, rotary, float(getattr(attn, "scaling", hd ** -0.5)), name)
    return _linear(g, out, [attn.o_proj], f"{name}.o_proj")


def _append_kv(g: _Graph, k: str, v: str, i: int, kv: int, hd: int, rotary: tuple[str, str], name: str) -> None:
    """Rotate K and write the window's K/V at its slots of the bound buffers, in place (TensorScatter: the
    output is the input buffer, so nothing is copied): present_key.i / present_value.i."""
    if "write_at" not in g.shared:   # the window's first slot: its first row's position
        first = g.one("Slice", ["position_ids", g.weight("kv.zero", np.array([0], np.int64)),
                                g.weight("kv.one", np.array([1], np.int64)), g.weight("kv.axis", np.array([1], np.int64))],
                      "kv/First")
        g.shared["write_at"] = g.one("Reshape", [first, g.weight("kv.flat", np.array([1], np.int64))], "kv/WriteAt")
    k = g.one("RotaryEmbedding", [k, "position_ids", *rotary], f"{name}/RotaryK", domain="com.microsoft",
              num_heads=kv, interleaved=0)
    for t, kind in ((k, "key"), (v, "value")):
        heads = g.one("Transpose", [g.one("Reshape", [t, g.weight(f"{name}.{kind}4", np.array([0, 0, kv, hd], np.int64))],
                                           f"{name}/{kind}Heads")], f"{name}/{kind}HeadMajor", perm=[0, 2, 1, 3])
        g.nodes.append(helper.make_node("TensorScatter", [f"past_{kind}.{i}", heads, g.shared["write_at"]],
                                        [f"present_{kind}.{i}"], name=f"{name}/Write{kind}", axis=2))


def _span_mask(g: _Graph, past_key: str, group: int) -> str:
    """The additive causal mask over the whole bound K/V buffer, one row per (token, query head of a K/V
    group) as the attention stacks them (doubled where a group has one head), made once and shared by a
    segment's layers: slot j is open to a row at position p where j <= p. The runtime binds buffers of
    `axes.attention_slots` (the span up to the next ATTENTION_SPAN multiple, plus one), so every reduction
    of a row has a length fixed by its position."""
    if "mask" not in g.shared:
        const = lambda n, v, t=np.int64: g.weight(f"span.{n}", np.array(v, t))  # noqa: E731
        slots = g.one("Shape", [past_key], "span/Slots", start=2, end=3)
        keys = g.one("Range", [const("zero", 0), g.one("Squeeze", [slots], "span/SlotCount"), const("one", 1)],
                     "span/Keys")
        rows = g.one("Reshape", ["position_ids", const("rows", [-1, 1, 1])], "span/Rows")
        visible = g.one("LessOrEqual", [keys, rows], "span/Visible")
        mask = g.one("Where", [visible, const("open", 0.0, np.float32),
                               const("shut", np.finfo(np.float32).min, np.float32)], "span/Mask")   # [seq, 1, slots]
        mask = g.one("Flatten", [g.one("Expand", [mask, const("group", [1, group, 1])], "span/MaskGroup")],
                     "span/MaskRows", axis=2)                                                    # [seq·group, slots]
        if group == 1:
            mask = g.one("Concat", [mask, mask], "span/TwiceMask", axis=0)
        g.shared["mask"] = mask
    return g.shared["mask"]


def _invariant_attention(g: _Graph, q: str, i: int, shape, rotary: tuple[str, str], scale: float, name: str) -> str:
    """softmax(q·Kᵀ·scale + causal mask)·V over the whole in-place K/V buffers, which the runtime binds at
    the span of the call's positions (`axes.attention_slots`).

    Every reduction has the same length for a row whatever its window (the span is fixed per
    ATTENTION_SPAN positions), and the query heads that share a K/V head are stacked as rows, so MLAS's
    GEMM sees at least two rows even for a single token (with one row it takes another kernel, and a row's
    bits change). A row thus gets the same bits in a window as alone: what makes speculative output equal
    autoregressive output."""
    h, kv, hd = shape.num_heads, shape.kv_heads, shape.head_dim
    group = h // kv
    const = lambda n, v, t=np.int64: g.weight(f"{name}.{n}", np.array(v, t))  # noqa: E731
    mask = _span_mask(g, f"past_key.{i}", group)
    rotated = g.one("RotaryEmbedding", [q, "position_ids", *rotary], f"{name}/RotaryQ", domain="com.microsoft",
                    num_heads=h, interleaved=0)
    # [1, seq, h·hd] -> [1, kv, seq·group, hd]: row = (token, head within its K/V group)
    heads = g.one("Reshape", [rotated, const("q5", [0, 0, kv, group, hd])], f"{name}/QHeads")
    rows = g.one("Reshape", [g.one("Transpose", [heads], f"{name}/QByKV", perm=[0, 2, 1, 3, 4]),
                             const("q4", [1, kv, -1, hd])], f"{name}/QRows")
    if group == 1:   # one query head per K/V head: run every row twice so the GEMM never sees one row
        rows = g.one("Concat", [rows, rows], f"{name}/TwiceRows", axis=2)
    keys, values = f"present_key.{i}", f"present_value.{i}"
    scores = g.one("MatMul", [rows, g.one("Transpose", [keys], f"{name}/KeysT", perm=[0, 1, 3, 2])], f"{name}/Scores")
    scores = g.one("Add", [g.one("Mul", [scores, const("scale", scale, np.float32)], f"{name}/Scale"), mask],
                   f"{name}/Masked")
    out = g.one("MatMul", [g.one("Softmax", [scores], f"{name}/Softmax", axis=-1), values], f"{name}/Context")
    if group == 1:
        seq = g.one("Shape", ["position_ids"], f"{name}/Seq", start=1, end=2)
        out = g.one("Slice", [out, const("zero", [0]), seq, const("axis2", [2])], f"{name}/OnceRows")
    # [1, kv, seq·group, hd] -> [1, seq, h·hd]
    out = g.one("Reshape", [out, const("o5", [1, kv, -1, group, hd])], f"{name}/OHeads")
    out = g.one("Transpose", [out], f"{name}/OByToken", perm=[0, 2, 1, 3, 4])
    return g.one("Reshape", [out, const("o3", [1, -1, h * hd])], f"{name}/Merge")


def _mlp(g: _Graph, x: str, mlp, i: int) -> str:
    name = f"layers.{i}.mlp"
    gate_up = _linear(g, x, [mlp.gate_proj, mlp.up_proj], f"{name}.gate_up_proj")
    gate, up = g.node("Split", [gate_up], f"{name}/SplitGateUp", 2, axis=-1, num_outputs=2)
    silu = g.one("Mul", [gate, g.one("Sigmoid", [gate], f"{name}/Sigmoid")], f"{name}/SiLU")
    return _linear(g, g.one("Mul", [silu, up], f"{name}/Mul"), [mlp.down_proj], f"{name}.down_proj")


def _rotary_caches(g: _Graph, model, arch, capacity: int) -> tuple[str, str]:
    """cos/sin `[capacity, hd/2]` from the model's own rotary module (inv_freq, rope scaling and its
    attention scaling included), so the fused rotary is the HF one."""
    positions = torch.arange(capacity)[None]
    with torch.no_grad():
        cos, sin = arch.position_embeddings(model, torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2
    return g.weight("cos_cache", cos[0, :, :half]), g.weight("sin_cache", sin[0, :, :half])


def _decoder_layers(g: _Graph, hidden: str, model, arch, layers: range, shape, rotary) -> str:
    """Pre-norm layers with the residual carried by SkipSimplifiedLayerNormalization's sum output."""
    residual, pending = hidden, None   # pending: the last sublayer's output, not yet added to residual
    for i in layers:
        layer = arch.layers_of(model)[i]
        for norm, block in ((layer.input_layernorm, "attn"), (layer.post_attention_layernorm, "mlp")):
            name, w = f"layers.{i}.{block}_norm", None
            w = g.weight(f"{name}.weight", norm.weight)
            if pending is None:
                x = g.one("SimplifiedLayerNormalization", [residual, w], name, axis=-1,
                          epsilon=_norm_eps(norm), stash_type=1)
            else:
                x, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [pending, residual, w], name,
                                           [f"{name}/out", "", "", f"{name}/sum"], domain="com.microsoft",
                                           epsilon=_norm_eps(norm))
            pending = (_attention(g, x, layer.self_attn, i, shape, rotary) if block == "attn"
                       else _mlp(g, x, layer.mlp, i))
    return g.one("Add", [pending, residual], "hidden_out/Add")


def _value_info(spec: TensorSpec):
    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
    return helper.make_tensor_value_info(spec.name, dtype, list(spec.shape))


def build_fused_segment(model, arch, shape, layers: range, capacity: int, path: Path,
                        quantized_embedding: bool = False) -> Path:
    """Write layers [start, stop) of the target as one fused ONNX graph at `path`; `quantized_embedding`
    stores the first segment's token table as int8 blocks."""
    inputs, outputs = fused_segment_io(shape, layers)
    params = [p for layer in arch.layers_of(model)[layers.start:layers.stop] for p in layer.parameters()]
    embed = arch.decoder_of(model).get_submodule(arch.embed) if layers.start == 0 else None
    quantized = [m.mapped.nbytes for layer in arch.layers_of(model)[layers.start:layers.stop]
                 for m in layer.modules() if hasattr(m, "mapped")]
    if embed is not None and hasattr(embed, "blocks"):
        quantized.append(embed.blocks.nbytes)
    elif embed is not None:
        params.append(embed.weight)
    external = sum(p.numel() for p in params) * 4 + sum(quantized) > _EXTERNAL_DATA_BYTES
    g = _Graph(path.with_name(path.name + ".data") if external else None)
    try:
        if embed is not None:
            hidden = embedding(g, embed, quantized_embedding)
        else:
            hidden = "hidden_states"
        rotary = _rotary_caches(g, model, arch, capacity)
        out = _decoder_layers(g, hidden, model, arch, layers, shape, rotary)
        g.nodes.append(helper.make_node("Identity", [out], ["hidden_out"], name="hidden_out/Identity"))
    finally:
        g.close()
    return _save(g, f"target_layers_{layers.start}_{layers.stop}", inputs, outputs, path)


def _save(g: _Graph, name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], path: Path) -> Path:
    """The written nodes and weights as one model at `path` (large tensors already sit in the side file).
    A weight no node reads is an error of the builder: ONNX Runtime would warn of it at every load."""
    read = {x for node in g.nodes for x in node.input}
    unused = [w.name for w in g.weights if w.name not in read]
    assert not unused, f"{name}: initializers no node reads: {unused[:5]}"
    graph = helper.make_graph(g.nodes, name, [_value_info(s) for s in inputs], [_value_info(s) for s in outputs],
                              g.weights)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="mirror-deploy fused target")
    proto.ir_version = 8
    onnx.save_model(proto, str(path))
    return path
