"""`mirror-deploy check DIR`: the CI compile check of an artifact.

In order: the manifest parses and agrees with itself and with its graph files; every file matches its
hash; every graph loads in the runtime its profile names; static (NPU-shaped) graphs have no dynamic
dimension and compile (OpenVINO CPU stands in for the NPU); and every exported graph matches PyTorch on
random tokens, driven through the KV caches the way decoding drives it (prefill, chunked decode, tree-
masked draft branches, padded static calls). Each finding is a row; any FAIL makes the check fail.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from .artifact import MANIFEST, Manifest, read_manifest, verify_files
from .errors import MirrorDeployError
from .export.architectures import arch_for
from .export.onnx_export import read_io
from .export.openvino_ir import ir_io
from .reference import Reference
from .decoding.drive import DraftDriver, TargetDriver
from .runtimes.kv import COMMITTED
from .runtimes.loader import draft_graph_name, open_graph, target_graph_names, target_graphs
from .runtimes.openvino import core
from .targets import PartProfile, Profile, load_profile

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
# fp32 drift grows with the size of the logits: a 30-layer real model whose logits reach tens drifts by
# ~1e-4 between PyTorch and a runtime, a tiny random one by ~1e-6. The limit is the larger of an absolute
# floor and a fraction of the largest reference logit; a broken graph misses it by orders of magnitude.
ATOL = 1e-4
RTOL = 5e-5   # the real 0.5B draft on ORT drifted 4.2e-4 with logits up to 17 (2.5e-5 relative)
# A compressed draft cannot match to 1e-4; it must still be the same model. A broken graph agrees with
# the reference on about 1/vocab of the rows, a faithful compressed one on nearly all.
# Measured on the real pair, random-token rows: the 0.5B draft with int4 weights (and int8 activations)
# agrees with fp32 on 56% (KL 0.38 nats); an int4 exit head at layer 10 of 28, where the logit lens is
# flat, on 61%. A broken graph agrees on ~1/vocab (0.0007%), so these bounds still catch one.
TOP1_MIN = {"fp16": 0.98, "int8": 0.75, "int4": 0.40}
TARGET_HEADS = ("target_head", "exit_head")
DRAFT_GRAPHS = ("draft", "draft_stateful", "draft_static")
CPU_STAND_IN = {"onnx": PartProfile("onnxruntime", "cpu", 1),
                "openvino": PartProfile("openvino", "CPU", 1, precision="f32")}


@dataclass
class Row:
    check: str
    graph: str
    result: str
    detail: str
    error: float | None = None
    limit: str = ""
    fix: str = ""


@dataclass
class CheckReport:
    folder: Path
    profile: str | None
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.result != FAIL for r in self.rows)

    def add(self, check, graph, ok: bool, detail, error=None, limit="", fix="") -> Row:
        self.rows.append(Row(check, graph, PASS if ok else FAIL, detail, error, limit, fix))
        return self.rows[-1]

    def fail(self, check, graph, err: MirrorDeployError, prefix: str = "") -> None:
        self.add(check, graph, False, prefix + err.problem, fix=err.fix or "")

    def skip(self, check, graph, why) -> None:
        self.rows.append(Row(check, graph, SKIP, why))


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
    if problems:
        return report  # graphs described by a manifest that disagrees with itself are not worth loading
    graphs = _load_graphs(folder, manifest, prof, intact, report)
    if skip_parity:
        for name in _parity_names(manifest):
            report.skip("parity", name, "--skip-parity given")
        return report
    _check_parity(manifest, graphs, report, atol, seed)
    return report


def manifest_problems(m: Manifest) -> list[str]:
    """Disagreements inside manifest.json: what a hand edit that still parses leaves behind."""
    try:
        return _manifest_problems(m)
    except (TypeError, AttributeError, KeyError, IndexError) as err:  # a field of the wrong type
        return [f"a field has the wrong type or is missing ({type(err).__name__}: {err})"]


def _manifest_problems(m: Manifest) -> list[str]:
    out = []
    n, nd, vocab = m.target.get("num_layers"), m.draft.get("num_layers"), m.target.get("vocab_size")
    missing = [g for g in ("target_seg0", "target_head", "draft") if g not in m.graphs]
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
    if m.draft.get("vocab_size") != vocab:
        out.append(f"target vocab {vocab} differs from draft vocab {m.draft.get('vocab_size')}")
    fused = [g for g in m.target_segments() if any(s["name"] == "seqlens_k" for s in m.graphs[g].inputs)]
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
        dims = {"logits": vocab, **({"top_ids": m.kappa, "top_logprobs": m.kappa} if name in TARGET_HEADS else {})}
        for spec in entry.outputs:
            if spec["name"] in dims and spec["shape"][-1] != dims[spec["name"]]:
                out.append(f"{name} output {spec['name']} ends in {spec['shape'][-1]}, "
                           f"the manifest implies {dims[spec['name']]}")
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
    """A fused target is fast because each layer is one GroupQueryAttention node over in-place K/V with
    packed projections (4 weight MatMuls a layer); count them in the files, so a builder that silently
    emitted something else is caught."""
    if m.target_attention != "fused":
        return
    names = m.target_segments()
    if not all(n in intact for n in names):
        report.skip("fused attention", "target", "not counted: a segment file is damaged (see hash)")
        return
    ops: dict[str, int] = {}
    for name in names:
        for node in onnx.load(str(folder / m.graphs[name].file), load_external_data=False).graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    layers = m.target["num_layers"]
    gqa, matmuls = ops.get("GroupQueryAttention", 0), ops.get("MatMul", 0) + ops.get("MatMulNBits", 0)
    report.add("fused attention", "target", gqa == layers and matmuls == 4 * layers,
               f"{gqa} of {layers} layers run GroupQueryAttention (in-place K/V); {matmuls} weight MatMuls "
               f"(4 a layer: packed QKV, o, packed gate/up, down)",
               fix="re-export the artifact (--target-attention fused), or report the regression")


def _check_tuning(folder: Path, m: Manifest, report: CheckReport) -> None:
    """tuning.json (when `mirror-deploy tune` ran): its hash, and choices the artifact can run."""
    from .tuning.store import read_tuning
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
    try:
        draft_name = draft_graph_name(m, prof)
    except MirrorDeployError as err:
        report.fail("load", "draft", err)
        draft_name = None
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
    fused, layers = graph.fused_attention, m.draft["num_layers"]
    if arch_for(m.draft["model_type"]).fused_attention:
        report.add("fused attention", name, fused == layers,
                   f"{fused} of {layers} layers run ScaledDotProductAttention in the compiled model",
                   fix="the installed OpenVINO did not fuse the draft's attention: use openvino 2026.4 "
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


def _parity_names(m: Manifest) -> list[str]:
    return ["target", *(f"exit@{layer}" for layer in m.exit_layers)] + [g for g in DRAFT_GRAPHS if g in m.graphs]


def _check_parity(m: Manifest, graphs: dict, report: CheckReport, atol: float, seed: int) -> None:
    try:
        ref = Reference.load(m)
    except MirrorDeployError as err:
        for name in _parity_names(m):
            report.fail("parity", name, err)
        return
    rng = np.random.default_rng(seed)
    vocab = m.target["vocab_size"]
    if all(g in graphs for g in target_graph_names(m)):
        _guard(report, "parity logits", "target",
               lambda: _target_parity(m, graphs, ref, rng, vocab, report, atol))
    else:
        report.skip("parity logits", "target", "not run: a target graph did not load")
    for name in DRAFT_GRAPHS:
        if name in graphs:
            _guard(report, "parity logits", name, lambda: _draft_parity(m, name, graphs[name], ref, rng,
                                                                              vocab, report, atol))
        elif name in m.graphs:
            report.skip("parity", name, "not run: graph did not load")


def _guard(report, check, graph, fn) -> None:
    try:
        fn()
    except Exception as err:  # a crash mid-comparison is a failed check, reported, not a traceback
        report.add(check, graph, False, f"{type(err).__name__}: {err}")


def _fit(chunks: list[int], room: int) -> list[int]:
    """Shrink the prefill so the schedule fits the KV capacity."""
    extra = sum(chunks[1:])
    return [max(1, min(chunks[0], room - extra)), *chunks[1:]] if room > extra else [room]


def _side_by_side(step, reference_step, ids, chunks) -> tuple[list, list]:
    """Feed the same consecutive chunks of `ids` to the graph under test and to the reference."""
    got, want, at = [], [], 0
    for size in chunks:
        got.append(step(ids[at:at + size]))
        want.append(reference_step(ids[at:at + size]))
        at += size
    return got, want


def _target_parity(m: Manifest, graphs, ref: Reference, rng, vocab, report, atol) -> None:
    """The composed target at its default exit layer against HF logits, then the early exit at every
    exported exit layer against the logit lens there (same windows, fresh KV each time)."""
    chunks = _fit([11, m.gamma + 1, 1, m.gamma + 1], m.max_context)
    ids = rng.integers(0, vocab, sum(chunks))
    reference = ref.target_graphs()
    note = f"segments + head, {len(ids)} tokens in windows {'+'.join(map(str, chunks))}"
    for layer in m.exit_layers:
        run = TargetDriver.for_manifest(target_graphs(m, graphs), m, layer)
        default = layer == m.exit_layer   # the composed logits are compared once, at the default split
        mirror = TargetDriver.for_manifest(target_graphs(m, reference), m, layer).window if default \
            else (lambda chunk: None)
        got, wrap = _side_by_side(run.window, mirror, ids, chunks)
        cat = {k: np.concatenate([g[k] for g in got]) for k in got[0]}
        if default:
            _logits_row(report, "parity logits", "target", cat["logits"],
                        np.concatenate([w["logits"] for w in wrap]), ref.target_logits(ids),
                        m.target_weights, atol, note + f", exit at {layer}")
        _exit_row(m, report, layer, cat, ref.logit_lens(ids, layer), atol)
    _adapter_rows(m, graphs, report, rng, atol)


def _adapter_rows(m: Manifest, graphs, report, rng, atol) -> None:
    """Each learned exit's ONNX graph against the translator weights it was exported from."""
    import torch

    from .tuning.attach import WEIGHTS_FILE
    from .tuning.translator import load_translators
    names = [k for k in m.graphs if k.startswith("exit_adapter_")]
    if not names:
        return
    translators = load_translators(report.folder / WEIGHTS_FILE)
    for name in names:
        layer = m.graphs[name].layers[0]
        hidden = rng.standard_normal((1, 5, m.target["hidden_size"])).astype(np.float32) * 3
        got = graphs[name].run({"hidden_states": hidden})["adapted"]
        with torch.no_grad():
            want = translators[layer](torch.from_numpy(hidden)).numpy()
        err, limit = float(np.abs(got - want).max()), fp32_limit(want, atol)
        report.add("parity learned exit", name, err <= limit,
                   f"ONNX vs the translator in {WEIGHTS_FILE} on 5 random rows", err, f"≤ {limit:.1e}")


def _exit_row(m: Manifest, report, layer: int, cat: dict, lens: np.ndarray, atol: float) -> None:
    atol = fp32_limit(lens, atol)
    order = np.argsort(-lens, axis=-1, kind="stable")[:, :m.kappa]
    differ = cat["exit_ids"] != order
    chosen = np.take_along_axis(lens, cat["exit_ids"], -1)
    ties = differ & (np.abs(chosen - np.take_along_axis(lens, order, -1)) <= atol)  # reordered near-ties
    lp_err = float(np.abs(cat["exit_logprobs"] - chosen).max())
    wrong = int(differ.sum() - ties.sum())
    detail = (f"ids vs logit lens on hidden_states[{layer}]: {differ.size - wrong}/{differ.size} equal"
              + (f" ({int(ties.sum())} near-tie swaps)" if ties.any() else "") + f"; log-probs {lp_err:.1e}")
    head = m.graphs["exit_head"].weights if "exit_head" in m.graphs else m.target_weights
    if head != "fp32":  # a quantized head is judged by top-1 agreement with the fp32 logit lens
        agree = float((cat["exit_ids"][:, 0] == order[:, 0]).mean())
        report.add("parity top-κ", f"exit@{layer}", agree >= TOP1_MIN[head],
                   f"{head} head, so top-1 agreement with the fp32 logit lens: {agree:.1%}; {detail}", lp_err,
                   f"top-1 ≥ {TOP1_MIN[head]:.0%}")
        return
    report.add("parity top-κ", f"exit@{layer}", wrong == 0 and lp_err <= atol, detail, lp_err,
               f"≤ {atol:.1e} (scaled like the logits)")


def _tree(width: int, rng, vocab: int) -> tuple[list[int], list[int]]:
    """Branches A and B from the committed prefix and, where the width allows, C forking off A's
    first token (so one call holds a real tree); one row is left free (width ≥ 3) so a static call
    also carries padding. Parents are indices within the call, -1 meaning the committed prefix."""
    budget = width - 1 if width >= 3 else width
    fork = budget // 4
    b = (budget - fork) // 2
    parents: list[int] = []

    def chain(root: int, length: int) -> None:
        for j in range(length):
            parents.append(root if j == 0 else len(parents) - 1)

    chain(-1, budget - fork - b), chain(-1, b), chain(0, fork)
    return [int(t) for t in rng.integers(0, vocab, len(parents))], parents


def _path(parents, j) -> list[int]:
    """Indices from the branch root down to j."""
    path = []
    while j >= 0:
        path.append(j)
        j = parents[j]
    return path[::-1]


def _draft_parity(m: Manifest, name: str, graph, ref: Reference, rng, vocab, report, atol) -> None:
    static = m.graphs[name].static
    run = DraftDriver.for_manifest(graph, m)
    mirror = DraftDriver.for_manifest(ref.draft_graph(static=static), m)
    chunks = _fit([11, 1, m.gamma], m.max_context - m.branch_batch - 1)
    ids = rng.integers(0, vocab, sum(chunks))
    got, wrap = _side_by_side(run.commit, mirror.commit, ids, chunks)
    tokens, parents = _tree(m.branch_batch + 1, rng, vocab)
    slots = [COMMITTED if p < 0 else run.call_slot(p) for p in parents]
    got.append(run.call(tokens, slots)[0])
    wrap.append(mirror.call(tokens, slots)[0])
    want = np.empty_like(got[-1])
    leaves = [j for j in range(len(tokens)) if j not in parents]
    for leaf in leaves:  # one forward per branch gives every node on it
        path = _path(parents, leaf)
        want[path] = ref.draft_logits([*ids, *(tokens[j] for j in path)])[-len(path):]
    hf = [ref.draft_logits(ids), want]
    branches = len(leaves)
    note = (f"{len(ids)} committed ({'+'.join(map(str, chunks))}), {branches}-branch tree of {len(tokens)}"
            + (f" padded to {run.static_seq}" if static else ""))
    _logits_row(report, "parity logits", name, np.concatenate(got), np.concatenate(wrap),
                np.concatenate(hf), m.graphs[name].weights, atol, note)


def fp32_limit(reference: np.ndarray, atol: float) -> float:
    """The fp32 tolerance for values on the scale of `reference` (see RTOL)."""
    return max(atol, RTOL * float(np.abs(reference).max()))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kl(reference: np.ndarray, got: np.ndarray) -> float:
    """Mean over rows of KL(softmax(reference) ‖ softmax(got)), in nats."""
    p, q = _log_softmax(reference), _log_softmax(got)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def _logits_row(report, check, name, got, wrap, hf, weights: str, atol: float, note: str) -> None:
    e_hf, e_wrap = float(np.abs(got - hf).max()), float(np.abs(got - wrap).max())
    agree = float((got.argmax(-1) == hf.argmax(-1)).mean())
    errors = f"vs HF {e_hf:.1e}, vs wrapper {e_wrap:.1e}; top-1 {agree:.1%}, KL {mean_kl(hf, got):.1e} nats"
    if weights == "fp32":
        worst, limit = max(e_hf, e_wrap), fp32_limit(hf, atol)
        report.add(check, name, worst <= limit, f"{note}; {errors}", worst,
                   f"≤ {limit:.1e} = max({atol:.0e}, {RTOL:.0e}·max|logit| {np.abs(hf).max():.1f})")
        return
    need = TOP1_MIN[weights]
    report.add(check, name, agree >= need,
               f"{weights} weights, so top-1 agreement and KL instead of an fp32 bound; {note}; {errors}",
               e_hf, f"top-1 ≥ {need:.0%}")


def print_report(report: CheckReport, console: Console) -> None:
    table = Table(title=f"mirror-deploy check {report.folder}")
    table.add_column("check", no_wrap=True)
    table.add_column("graph")
    table.add_column("result", no_wrap=True)
    table.add_column("detail", overflow="fold", ratio=1)
    table.add_column("max error")
    style = {PASS: "green", FAIL: "bold red", SKIP: "yellow"}
    for r in report.rows:
        error = "" if r.error is None else f"{r.error:.1e} {r.limit}"
        table.add_row(r.check, r.graph, f"[{style[r.result]}]{r.result}[/]", r.detail, error)
    console.print(table)
    fixes = dict.fromkeys(r.fix for r in report.rows if r.result == FAIL and r.fix)
    for fix in fixes:
        console.print(f"  [bold]fix:[/] {fix}", highlight=False)
    counts = {k: sum(r.result == k for r in report.rows) for k in (PASS, FAIL, SKIP)}
    verdict = "[green]passed[/]" if report.ok else "[bold red]FAILED[/]"
    console.print(f"{verdict}: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped")
