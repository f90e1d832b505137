"""`mirror-deploy check DIR`: the CI compile check of an artifact.

In order: the manifest parses and agrees with itself and with its graph files; every file matches its
hash; every graph loads in the runtime its profile names; static (NPU-shaped) graphs have no dynamic
dimension and compile (OpenVINO CPU stands in for the NPU); and every exported graph matches PyTorch on
random tokens, driven through the KV caches the way decoding drives it (prefill, chunked decode, tree-
masked draft branches, padded static calls). Each finding is a row; any FAIL makes the check fail.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import onnx

from ..artifact import MANIFEST, Manifest, read_manifest, verify_files
# check's API: check_artifact, print_report, the row results and the parity bounds
from .report import FAIL, PASS, SKIP, CheckReport, Row, print_report  # noqa: F401
from ..errors import MirrorDeployError
from ..export.architectures import arch_for
from ..export.onnx_export import read_io
from ..export.openvino_ir import ir_io
from .gguf import check_gguf_draft, check_gguf_weights
from .streams import check_streams
from .parity import ATOL, DRAFT_GRAPHS, RTOL, TOP1_MIN, check_parity, fp32_limit, mean_kl, parity_names  # noqa: F401
from ..runtimes.loader import with_vocab, draft_graph_name, open_graph, target_graph_names
from ..runtimes.openvino import core
from ..targets import PartProfile, Profile, load_profile

TARGET_HEADS = ("target_head", "exit_head")
CPU_STAND_IN = {"onnx": PartProfile("onnxruntime", "cpu", 1),
                "openvino": PartProfile("openvino", "CPU", 1, precision="f32")}


def check_artifact(folder, profile: str | None = None, skip_parity: bool = False, atol: float = ATOL,
                   seed: int = 0) -> CheckReport:
    """Run every check on the artifact at `folder`; `profile` overrides the one it was exported for."""
    folder = Path(folder)
    report = CheckReport(folder, profile)
    try:
        manifest = read_manifest(folder)
    except MirrorDeployError as err:
        report.fail("manifest", MANIFEST, err)
        return report
    except AttributeError as err:  # valid JSON of the wrong structure, which read_manifest lets through
        report.add("manifest", MANIFEST, False, f"{folder / MANIFEST} does not validate ({err})")
        return report
    problems = manifest_problems(manifest)
    try:
        prof = load_profile(profile) if profile else Profile.from_dict(manifest.profile, source=MANIFEST)
    except MirrorDeployError as err:
        if profile:
            raise
        problems.append(f"recorded profile: {err.problem}")
    report.add("manifest", MANIFEST, not problems,
               "; ".join(problems) or f"{len(manifest.graphs)} graphs, ℓe={manifest.exit_layer}, "
               f"κ={manifest.kappa}, γ={manifest.gamma}, capacity {manifest.max_context}")
    try:
        intact = _check_files(folder, manifest, report)
    except (TypeError, AttributeError, KeyError) as err:  # graph entries of the wrong structure
        report.add("hash", MANIFEST, False, f"graph entries do not validate ({type(err).__name__}: {err})")
        return report
    _check_tuning(folder, manifest, report)
    _check_fused_target(folder, manifest, intact, report)
    if manifest.target_weights == "gguf":
        check_gguf_weights(folder, manifest, intact, report)
    if manifest.draft and manifest.draft.get("gguf_file"):
        check_gguf_draft(folder, manifest, intact, report)
    if problems:
        return report  # graphs described by a manifest that disagrees with itself are not worth loading
    graphs = _load_graphs(folder, manifest, prof, intact, report)
    check_streams(folder, manifest, prof, intact, report, parity=not skip_parity, seed=seed)
    if skip_parity:
        for name in parity_names(manifest):
            report.skip("parity", name, "--skip-parity given")
        return report
    check_parity(manifest, graphs, report, atol, seed)
    return report


def manifest_problems(m: Manifest) -> list[str]:
    """Disagreements inside manifest.json: what a hand edit that still parses leaves behind."""
    try:
        return _manifest_problems(m)
    except (TypeError, AttributeError, KeyError, IndexError) as err:  # a field of the wrong type
        return [f"a field has the wrong type or is missing ({type(err).__name__}: {err})"]


def _manifest_problems(m: Manifest) -> list[str]:
    out = []
    n, vocab = m.target.get("num_layers"), m.target.get("vocab_size")
    nd = m.draft.get("num_layers") if m.has_draft else None
    missing = [g for g in ("target_seg0", "target_head") if g not in m.graphs]
    if m.has_draft and not any(g in m.graphs for g in DRAFT_GRAPHS):
        missing.append("a draft graph (" + " or ".join(DRAFT_GRAPHS) + ")")
    if not m.has_draft and any(g in m.graphs for g in DRAFT_GRAPHS):
        return ["draft graphs are listed but the manifest records no draft model"]
    if missing:
        return [f"graphs missing from the manifest: {', '.join(missing)}"]
    if m.exit_layer not in m.exit_layers:
        out.append(f"exit_layer {m.exit_layer} is not one of the exported exit layers {m.exit_layers}")
    if not (isinstance(n, int) and all(1 <= b <= n - 1 for b in m.exit_layers)):
        out.append(f"exit layers {m.exit_layers} are not all inside [1, {n}-1]")
    if not (isinstance(vocab, int) and 1 <= m.kappa <= vocab):
        out.append(f"kappa {m.kappa} is outside [1, vocab {vocab}]")
    if m.gamma < 1 or m.branch_batch < 1:
        out.append(f"gamma {m.gamma} and branch_batch {m.branch_batch} must be ≥ 1")
    if m.has_draft and m.draft.get("vocab_size") != vocab:
        out.append(f"target vocab {vocab} differs from draft vocab {m.draft.get('vocab_size')}")
    # Fused segments: ONNX Runtime's bind K/V in place (seqlens_k), OpenVINO-native ones hold them as state (beam_idx).
    fused = [g for g in m.target_segments() if any(s["name"] in ("seqlens_k", "beam_idx") for s in m.graphs[g].inputs)]
    if fused != (m.target_segments() if m.target_attention == "fused" else []):
        out.append(f"target_attention is {m.target_attention!r} but the fused segments are {fused or 'none'}")
    cuts = [0, *sorted(m.exit_layers), n]
    implied = [[a, b] for a, b in zip(cuts, cuts[1:])]
    tiled = [m.graphs[g].layers for g in m.target_segments()]
    if tiled != implied:
        out.append(f"target segments hold layers {tiled}, the exit layers {m.exit_layers} imply {implied}")
    layers = {g: [n, n] for g in TARGET_HEADS}
    layers.update({g: [0, nd] for g in DRAFT_GRAPHS})
    for name, entry in m.graphs.items():
        if name in layers and entry.layers != layers[name]:
            out.append(f"{name} holds layers {entry.layers}, the manifest implies {layers[name]}")
    for name, entry in m.graphs.items():
        # The heads' top-κ is the manifest's κ; the draft's own top-m is a fixed width of its graphs.
        width = m.draft_vocab["size"] if m.vocab_cut(name) else vocab
        dims = {"logits": width, **({"top_ids": m.kappa, "top_logprobs": m.kappa} if name in TARGET_HEADS else {})}
        for spec in entry.outputs:
            if spec["name"] in dims and spec["shape"][-1] != dims[spec["name"]]:
                out.append(f"{name} output {spec['name']} ends in {spec['shape'][-1]}, "
                           f"the manifest implies {dims[spec['name']]}")
    out += _vocab_problems(m)
    return out


def _vocab_problems(m: Manifest) -> list[str]:
    cut = m.draft_vocab
    if cut is None:
        return []
    vocab = m.draft.get("vocab_size") if m.has_draft else None
    out = []
    if not (isinstance(vocab, int) and 1 <= cut.get("size", 0) <= vocab):
        out.append(f"draft_vocab size {cut.get('size')} is outside [1, draft vocab {vocab}]")
    for name in cut.get("graphs", []):
        if name not in m.graphs:
            out.append(f"draft_vocab names graph {name}, which the manifest does not list")
        elif cut.get("file") not in m.graphs[name].sha256:
            out.append(f"{name} is cut to draft_vocab but does not hash its id file {cut.get('file')}")
    return out


def _check_files(folder: Path, m: Manifest, report: CheckReport) -> set[str]:
    """Hash rows, then the recorded I/O against each intact file. Returns the intact graphs."""
    damaged: dict[str, list[str]] = {}
    for graph, file, why in verify_files(folder, m):
        path = folder / file
        size = f", {path.stat().st_size} bytes" if path.is_file() else ""
        damaged.setdefault(graph, []).append(f"{file}: {why}{size}")
    intact = set()
    for name, entry in m.graphs.items():
        if name in damaged:
            report.add("hash", name, False, "; ".join(damaged[name]))
            continue
        io = read_io(folder / entry.file) if entry.format == "onnx" else ir_io(folder / entry.file)
        same_io = io == (entry.inputs, entry.outputs)
        report.add("hash", name, same_io, f"{', '.join(entry.sha256)} match" + (
            "" if same_io else f"; but manifest.json's inputs/outputs for {name} differ from {entry.file}"))
        intact.add(name)
    return intact


def _check_fused_target(folder: Path, m: Manifest, intact: set[str], report: CheckReport) -> None:
    """A fused target is fast and exact because each layer writes its K/V in place (two TensorScatter over
    the bound buffers), runs the row-invariant attention (one Softmax) and packed projections (4 weight
    MatMuls a layer); count them in the files, so a builder that silently emitted something else is caught."""
    if m.target_attention != "fused" or m.graphs[m.target_segments()[0]].format == "openvino":
        return   # OpenVINO-native segments: their fused attention is counted in the compiled graphs (_load_graphs)
    names = m.target_segments()
    if not all(n in intact for n in names):
        report.skip("fused attention", "target", "not counted: a segment file is damaged (see hash)")
        return
    ops: dict[str, int] = {}
    projections = set()
    for name in names:
        for node in onnx.load(str(folder / m.graphs[name].file), load_external_data=False).graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
            # A GGUF projection may be several MatMulNBits (one per type, `.partN`) plus its offsets' MatMul.
            base = re.sub(r"\.part\d+$", "", node.name.split("/")[0])
            if node.op_type in ("MatMul", "MatMulNBits") and base.endswith("_proj") and not node.name.endswith("/Offsets"):
                projections.add(base)
    layers = m.target["num_layers"]
    writes, softmax, gqa = ops.get("TensorScatter", 0), ops.get("Softmax", 0), ops.get("GroupQueryAttention", 0)
    if gqa:   # artifacts exported before the row-invariant attention: fast, not exact
        report.add("fused attention", "target", gqa == layers and len(projections) == 4 * layers,
                   f"{gqa} of {layers} layers run GroupQueryAttention, which computes a row differently alone than in "
                   "a window: speculative output may leave AR's at a near-tie (re-export for exactness)")
        return
    report.add("fused attention", "target", writes == 2 * layers and softmax == layers and len(projections) == 4 * layers,
               f"{softmax} of {layers} layers run the row-invariant attention over in-place K/V ({writes} K/V writes); "
               f"{len(projections)} weight MatMuls (4 a layer: packed QKV, o, packed gate/up, down)",
               fix="re-export the artifact (--target-attention fused), or report the regression")


def _check_tuning(folder: Path, m: Manifest, report: CheckReport) -> None:
    """tuning.json (when `mirror-deploy tune` ran): its hash, and choices the artifact can run."""
    from ..costs.tuned import read_tuning
    if not m.tuning:
        report.add("tuning", "tuning.json", True, "not tuned: runs use the manifest's defaults "
                   "(`mirror-deploy tune DIR` measures and chooses settings)")
        return
    try:
        data = read_tuning(folder, m)
    except MirrorDeployError as err:
        report.fail("tuning", "tuning.json", err)
        return
    mirror = data["choice"]["mirror"]
    report.add("tuning", "tuning.json", True,
               f"hash matches; mirror ℓe={mirror['exit_layer']} κ={mirror['kappa']} γ={mirror['gamma']} "
               f"budget={mirror['branch_budget']}, sd γ={data['choice']['sd']['gamma']}, on profile {data['profile']}")


def _load_graphs(folder, m: Manifest, prof: Profile, intact: set[str], report: CheckReport) -> dict:
    """Every graph in the runtime the profile names (graphs it does not use: on the CPU runtime of
    their format). Static graphs are also checked for dynamic dims and compiled on OpenVINO CPU."""
    draft_name = None
    try:
        if m.has_draft:
            draft_name = draft_graph_name(m, prof)
        else:
            report.add("load", "draft", True, "target-only artifact: no draft (modes ar and lookup)")
    except MirrorDeployError as err:
        report.fail("load", "draft", err)
    uses = {**{g: prof.target for g in target_graph_names(m)}, draft_name: prof.draft}
    graphs = {}
    for name, entry in m.graphs.items():
        if name not in intact:
            report.skip("load", name, "file damaged (see hash)")
            continue
        part = uses.get(name) or CPU_STAND_IN[entry.format]
        how = "" if name in uses else f" (not used by profile {prof.name})"
        graph = _open(folder, m, name, part, "load", how, report)
        if entry.static:
            _check_static_dims(folder, m, name, report)
            if (part.backend, part.device.upper()) != ("openvino", "CPU"):  # CPU stands in for the NPU
                graph = _open(folder, m, name, CPU_STAND_IN["openvino"], "compile", " (CPU for the NPU)", report)
        if graph is not None:
            graphs[name] = graph
            if getattr(graph, "stateful", False):
                _check_fused_attention(m, name, graph, report)
    return graphs


def _check_fused_attention(m: Manifest, name: str, graph, report: CheckReport) -> None:
    """The stateful draft is fast because OpenVINO's CPU plugin fuses its attention; that fusion is
    internal to OpenVINO, so a version change can lose it without any error. Count it in the compiled
    runtime model. Families where it is not expected (GPT-2) are reported, not failed."""
    entry = m.graphs[name]
    fused, layers = graph.fused_attention, entry.layers[1] - entry.layers[0]
    model = m.draft if name in DRAFT_GRAPHS else m.target
    if arch_for(model["model_type"]).fused_attention:
        report.add("fused attention", name, fused == layers,
                   f"{fused} of {layers} layers run ScaledDotProductAttention in the compiled model",
                   fix=f"the installed OpenVINO did not fuse {name}'s attention: use openvino 2026.4 "
                       "(pinned in pyproject.toml), re-export, or report the regression")
    elif fused:
        report.add("fused attention", name, True, f"{fused} of {layers} layers fused")
    else:
        report.skip("fused attention", name, f"OpenVINO does not fuse {m.draft['model_type']}'s attention "
                                             "from this export; the stateful draft runs it unfused")


def _open(folder, m, name, part: PartProfile, check: str, how: str, report: CheckReport):
    start = time.perf_counter()
    logical = "draft" if name in DRAFT_GRAPHS else name
    try:
        graph = open_graph(folder, m, name, part, logical)
        if logical == "draft":
            with_vocab(graph, folder, m, name)
    except MirrorDeployError as err:
        report.fail(check, name, err, f"{part.backend} {part.device}: ")
        return None
    except Exception as err:  # a runtime refusing a graph is the finding this row exists for
        report.add(check, name, False, f"{part.backend} {part.device}: {type(err).__name__}: {err}")
        return None
    report.add(check, name, True, f"{part.backend} {graph.device}{how}, {time.perf_counter() - start:.2f} s")
    return graph


def _check_static_dims(folder, m: Manifest, name: str, report: CheckReport) -> None:
    model = core().read_model(str(folder / m.graphs[name].file))
    seq = m.branch_batch + 1
    ports = (*model.inputs, *model.outputs)
    dynamic = [p.get_any_name() for p in ports if p.get_partial_shape().is_dynamic]
    if dynamic:
        report.add("static shapes", name, False, f"dynamic dimensions in: {', '.join(dynamic)}")
        return
    shapes = {p.get_any_name(): p.get_partial_shape().to_shape() for p in model.inputs}
    width, capacity = shapes["input_ids"][1], shapes["past_key.0"][1]
    report.add("static shapes", name, (width, capacity) == (seq, m.max_context),
               f"no dynamic dimension; width {width} (branch_batch+1 = {seq}), KV {capacity} "
               f"(max_context {m.max_context})")
