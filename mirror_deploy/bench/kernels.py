"""The 4-bit kernel routes on this machine at 1 / 2 / 4 / 8 rows: what a verify window can cost.

    python -m mirror_deploy.bench.kernels [--layers 6] [--rounds 9] [--threads 2] [--gguf FILE] [--inductor] [--only ROUTES]

Every route multiplies the same stack of projections of the real target's shapes (Qwen2.5-1.5B: q/k/v packed
1536→2048, o 1536→1536, gate/up packed 1536→17920, down 8960→1536, `--layers` layers: more weight bytes than
the cache holds), with random weights, timed interleaved (medians). For each route: ms at 1 row, the ratio
of 2 / 4 / 8 rows to 1 row, the GB/s streamed at 1 row, and whether a row gets the same bits in an 8-row
call as in a 2-row call (what speculative exactness needs; 1-row calls are padded to 2, see axes.py).
`--gguf` adds llama.cpp's own forward (llama-bench, prompt batches of 1 / 2 / 4 / 8 tokens) on that file;
`--inductor` adds torch.compile's C++ int4 GEMM template (autotuned against the eager kernel; minutes).
"""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import numpy as np

SHAPES = [(1536, 2048), (1536, 1536), (1536, 17920), (8960, 1536)]   # (K, N) per layer, Qwen2.5-1.5B
ROWS = (1, 2, 4, 8)


def _weights(layers: int, rng) -> list[np.ndarray]:
    return [(rng.standard_normal((k, n)) * 0.02).astype(np.float32) for _ in range(layers) for k, n in SHAPES]


def ort_route(weights, threads: int, block: int, level: int):
    """ONNX Runtime MatMulNBits (int4, symmetric), one graph of independent MatMuls on one input per K."""
    import logging

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    nodes, inits, outs = [], [], []
    for i, w in enumerate(weights):
        x = "x1536" if w.shape[0] == 1536 else "x8960"
        inits.append(onnx.numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, k]) for n, k in (("x1536", 1536), ("x8960", 8960))]
    model = helper.make_model(helper.make_graph(nodes, "routes", inputs, outs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=True, accuracy_level=level)
    quantizer.process()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(quantizer.model.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda a, b: session.run(None, {"x1536": a, "x8960": b})


def ov_route(weights, threads: int, dynamic_quantization: bool):
    """OpenVINO: NNCF int4 (symmetric, groups of 128) weight-decompression MatMuls."""
    import nncf
    import openvino as ov
    from openvino import opset13 as ops

    a = ops.parameter([-1, 1536], ov.Type.f32, name="x1536")
    b = ops.parameter([-1, 8960], ov.Type.f32, name="x8960")
    outs = [ops.matmul(a if w.shape[0] == 1536 else b, ops.constant(np.ascontiguousarray(w.T)), False, True)
            for w in weights]
    model = nncf.compress_weights(ov.Model(outs, [a, b]), mode=nncf.CompressWeightsMode.INT4_SYM, group_size=128,
                                  ratio=1.0, all_layers=True)
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
              "DYNAMIC_QUANTIZATION_GROUP_SIZE": 32 if dynamic_quantization else 0}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    return lambda x, y: [t.copy() for t in request.infer({"x1536": x, "x8960": y}).values()]


def q4_route(weights, threads: int):
    """Ours (mirror_deploy/kernels): the same int4 g128 codes in our layout, int8 activations, as an OpenVINO
    extension op; its ISA path is the one `python -m mirror_deploy.kernels status` names."""
    import tempfile

    import onnx
    import openvino as ov

    from ..kernels import layout, load_into
    from ..kernels.graph import matmuls_model

    packed = [layout.pack(*layout.quantize(np.ascontiguousarray(w.T), 128), 128) for w in weights]
    core = ov.Core()
    load_into(core)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q4.onnx"
        onnx.save(matmuls_model(packed), str(path))
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                          "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda x, y: [t.copy() for t in request.infer({"x1536": x, "x8960": y}).values()]


def torch_route(weights, threads: int, compiled: bool):
    """torch's CPU int4 pack (`_weight_int4pack_mm_for_cpu`, groups of 128, bf16 activations), eager or
    through Inductor's C++ WOQ-int4 GEMM template (max-autotune picks it where it beats the eager kernel)."""
    import torch

    torch.set_num_threads(threads)
    group = 128

    class Projections(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ks = []
            for i, w in enumerate(weights):
                k, n = w.shape
                t = torch.from_numpy(np.ascontiguousarray(w.T)).reshape(n, k // group, group)
                scale = t.abs().amax(-1).clamp_min(1e-8) / 7
                q = (torch.round(t / scale[..., None]) + 8).clamp(0, 15).to(torch.int32).reshape(n, k)
                zero = torch.zeros_like(scale)
                self.register_buffer(f"w{i}", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
                self.register_buffer(f"s{i}", torch.stack([scale.T, zero.T], -1).to(torch.bfloat16).contiguous())
                self.ks.append(k)

        def forward(self, a, b):
            return [torch.ops.aten._weight_int4pack_mm_for_cpu(a if k == 1536 else b, getattr(self, f"w{i}"), group,
                                                              getattr(self, f"s{i}")) for i, k in enumerate(self.ks)]

    module = Projections()
    if compiled:
        import torch._inductor.config as inductor
        inductor.freezing = True       # the weights are constants: the template packs them once
        module = torch.compile(module, mode="max-autotune", dynamic=False)

    def call(a, b):
        with torch.no_grad():
            return [y.float().numpy() for y in module(torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16())]
    return call


def llama_bench_ms(gguf: Path, threads: int, rounds: int) -> dict[int, float]:
    """ms per forward of a batch of r prompt tokens, from llama.cpp's own llama-bench (`make llama-cpp`)."""
    import json
    from .peers.llama_cpp import _built
    out = subprocess.run([str(_built("bin/llama-bench")), "-m", str(gguf), "-p", ",".join(map(str, ROWS)), "-n", "0",
                          "-t", str(threads), "-r", str(rounds), "-o", "json"], capture_output=True, text=True,
                         check=True)
    return {int(r["n_prompt"]): 1e3 * r["n_prompt"] / r["avg_ts"] for r in json.loads(out.stdout) if r["n_prompt"]}


def main(argv=None) -> None:
    from rich.console import Console
    from rich.table import Table
    from ..timing import interleaved

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gguf", type=Path, default=None, help="also time llama.cpp's forward on this file")
    parser.add_argument("--inductor", action="store_true", help="also time torch.compile's int4 GEMM template")
    parser.add_argument("--only", default="ort,ov,torch,ours",
                        help="route families to time, comma-separated: ort, ov, torch, ours")
    args = parser.parse_args(argv)
    if args.gguf is not None and not args.gguf.is_file():
        parser.exit(1, f"error: --gguf {args.gguf} is not a file. fix: pass a .gguf file, e.g. "
                       "~/.cache/mirror-deploy/gguf/qwen2.5-coder-1.5b-instruct.gguf\n")
    if min(args.layers, args.rounds, args.threads) < 1:
        parser.exit(1, "error: --layers, --rounds and --threads must be at least 1. fix: pass positive counts\n")
    rng = np.random.default_rng(0)
    weights = _weights(args.layers, rng)
    streamed = sum(w.size for w in weights) / 2          # 4-bit weights, bytes (scales aside)
    only = {f.strip() for f in args.only.split(",") if f.strip()}
    if not only or only - {"ort", "ov", "torch", "ours"}:
        parser.exit(1, f"error: --only {args.only!r} names no known route family. fix: use ort, ov, torch, ours\n")
    routes = {}
    if "ort" in only:
        routes.update({f"ORT MatMulNBits acc{level} block{block}": ort_route(weights, args.threads, block, level)
                       for level, block in ((4, 128), (4, 32), (0, 128))})
    if "ours" in only:
        from ..kernels import status
        kernel = status()
        if kernel.available:
            routes[f"ours: Q4MatMul g128 ({kernel.isa}), int8 activations"] = q4_route(weights, args.threads)
        else:
            print(f"note: our kernel is not in the table: {kernel.why}")
    if "ov" in only:
        routes["OpenVINO int4 g128, int8 activations"] = ov_route(weights, args.threads, True)
        routes["OpenVINO int4 g128, fp32 activations"] = ov_route(weights, args.threads, False)
    if "torch" in only:
        routes["torch int4pack g128, bf16 activations"] = torch_route(weights, args.threads, False)
    if args.inductor and "torch" in only:
        routes["torch.compile int4 GEMM template"] = torch_route(weights, args.threads, True)
    x = {r: (rng.standard_normal((r, 1536)).astype(np.float32), rng.standard_normal((r, 8960)).astype(np.float32))
         for r in ROWS}
    items = {(name, r): (lambda f=f, r=r: f(*x[r])) for name, f in routes.items() for r in ROWS}
    ms = {k: v * 1e3 for k, v in interleaved({f"{n}|{r}": fn for (n, r), fn in items.items()}, args.rounds).items()}
    table = Table(title=f"{args.layers} layers of Qwen2.5-1.5B projections ({streamed / 1e6:.0f} MB at 4 bits), "
                        f"{args.threads} threads, medians of {args.rounds} interleaved rounds")
    for col in ("route", "ms × 1", "GB/s × 1", *(f"× {r} ÷ × 1" for r in ROWS[1:]), "row bits: 2 rows = 8 rows"):
        table.add_column(col, justify="left" if col == "route" else "right")
    for name, f in routes.items():
        one = ms[f"{name}|1"]
        a2, b2 = x[8][0][:2], x[8][1][:2]
        same = all(np.array_equal(p[:2], q) for p, q in zip(f(*x[8]), f(a2, b2)))
        table.add_row(name, f"{one:.2f}", f"{streamed / one / 1e6:.1f}",
                      *(f"{ms[f'{name}|{r}'] / one:.2f}×" for r in ROWS[1:]), "yes" if same else "no")
    console = Console()
    console.print(table)
    if args.gguf:
        forward = llama_bench_ms(args.gguf, args.threads, max(3, args.rounds // 3))
        if 1 in forward:
            console.print(f"llama.cpp forward on {args.gguf.name} ({args.threads} threads, whole model): "
                          f"{forward[1]:.2f} ms at 1 token; " + ", ".join(
                              f"{r} tokens {forward[r] / forward[1]:.2f}×" for r in ROWS[1:] if r in forward))


if __name__ == "__main__":
    from . import command
    command(main)
