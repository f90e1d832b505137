"""`mirror-deploy export`: source models -> graphs -> OpenVINO IR -> tokenizer -> manifest.

Everything is built in a temporary folder beside DIR and moved into place only when complete, so a
failure or Ctrl-C leaves no DIR and no partial file.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..artifact import GraphEntry, Manifest, sha256_file
from ..errors import MirrorDeployError
from ..targets import Profile, load_profile
from .fused_target import build_fused_head, build_fused_segment
from .gguf_model import gguf_file_of, gguf_tokens, load_gguf_model, published_table
from . import gguf_draft
from .graphs import FullModel, StatefulDraft, TargetHead, TargetSegment, grouped_attention
from .loading import SourceModel, open_source
from .onnx_export import convert_to_fp16, export_graph, graph_files, quantize_matmuls, read_io, trace
from .openvino_ir import convert_draft, convert_stateful_draft, convert_target_graph, ir_io
from ..axes import static_draft_dims
from .shapes import draft_top_m, graph_io
from .options import (EXIT_HEAD_FORMATS, QUANTIZED_EMBEDDING, TARGET_ATTENTION, TARGET_WEIGHT_BITS,  # noqa: F401
                      WEIGHT_BITS, ExportOptions, default_exit_layers, target_attention, validate)

def same_vocabulary(target: SourceModel, draft: SourceModel, target_tok) -> None:
    """Target and draft must map tokens to the same ids. Two GGUF files are compared by their token lists,
    read from the headers (converting the draft's tokenizer only to compare it took 26 s)."""
    if target.path.suffix == ".gguf" and draft.path.suffix == ".gguf":
        same = gguf_tokens(target.path) == gguf_tokens(draft.path)
    else:
        draft_tok = draft.load_tokenizer()
        same = target_tok is None or draft_tok is None or target_tok.get_vocab() == draft_tok.get_vocab()
    if not same:
        raise MirrorDeployError("target and draft tokenizers map tokens to different ids",
                                "pick a draft trained with the target's tokenizer")


@contextmanager
def staging_folder(out: Path):
    """A scratch folder beside `out`; on success it replaces `out`, on any failure it disappears."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(trash / out.name)
            stage.rename(out)
            shutil.rmtree(trash)
        else:
            stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _graph_entry(folder: Path, path: Path, layers: range, fmt: str = "onnx", static=False, weights="fp32"):
    """Files, hashes and I/O of one written graph, as the manifest records them."""
    files = graph_files(path) if fmt == "onnx" else [path, path.with_suffix(".bin")]
    inputs, outputs = read_io(path) if fmt == "onnx" else ir_io(path)
    return GraphEntry(file=path.name, format=fmt, sha256={f.name: sha256_file(f) for f in files},
                      inputs=inputs, outputs=outputs, layers=[layers.start, layers.stop],
                      static=static, weights=weights)


def draft_static_shapes(draft: SourceModel, opts: ExportOptions) -> dict[str, list[int]]:
    """Pinned shapes of the NPU draft: one call holds at most branch_batch + 1 tokens."""
    dims = static_draft_dims(opts.branch_batch, opts.max_context)
    inputs, _ = graph_io("draft", draft.shape, range(draft.shape.num_layers))
    return {s.name: [dims.get(d, d) if isinstance(d, str) else d for d in s.shape] for s in inputs}


def trace_stateful_draft(scratch: Path, draft: SourceModel, model) -> Path:
    """The draft traced with head-major K/V (past in, past ⊕ new out), as scattered ONNX in `scratch`:
    OpenVINO reads it as is (one consolidated copy would be one more copy of the weights in memory)."""
    layers = range(draft.shape.num_layers)
    inputs, outputs = graph_io("draft_stateful", draft.shape, layers)
    module = StatefulDraft(draft.arch, model, 0, layers.stop, draft_top_m(draft.shape))
    return trace(module, inputs, outputs, draft.shape, scratch)


@dataclass
class FusedSegment:
    """A target segment written node by node from the weights (fused_target.py), not traced."""
    source: SourceModel
    model: object
    layers: range
    capacity: int
    quantized_embedding: bool = False

    def build(self, path: Path) -> Path:
        return build_fused_segment(self.model, self.source.arch, self.source.shape, self.layers, self.capacity, path,
                                   self.quantized_embedding)


@dataclass
class FusedHead:
    """The final norm + LM head written node by node (a GGUF target's head stays in its blocks)."""
    source: SourceModel
    model: object
    kappa: int

    def build(self, path: Path) -> Path:
        return build_fused_head(self.model, self.source.arch, self.source.shape, self.kappa, path)


@dataclass
class OvSegment:
    """A target segment as an OpenVINO-native graph, K/V as its state (openvino_target.py)."""
    source: SourceModel
    model: object
    layers: range
    capacity: int
    weights: str
    kernel: bool

    def build(self, path: Path) -> Path:
        from .openvino_target import build_ov_segment, save_ov
        return save_ov(build_ov_segment(self.model, self.source.arch, self.source.shape, self.layers, self.capacity,
                                        self.weights, self.kernel), path)


@dataclass
class OvHead:
    source: SourceModel
    model: object
    kappa: int
    weights: str
    kernel: bool

    def build(self, path: Path) -> Path:
        from .openvino_target import build_ov_head, save_ov
        return save_ov(build_ov_head(self.model, self.source.arch, self.source.shape, self.kappa, self.weights,
                                     self.kernel), path)


BUILT = (FusedSegment, FusedHead, OvSegment, OvHead)   # written from the weights, not traced


def target_kernel(opts: ExportOptions, profiles: list[Profile], attention: str) -> bool:
    """Does an OpenVINO-native int4 target run our 4-bit kernel? Asked (--target-kernel), or by default where
    it is built and every profile runs the target on the CPU (the kernel is a CPU op)."""
    if attention != "fused" or profiles[0].target.backend != "openvino" or opts.target_weights not in ("int4", "gguf"):
        return False
    if opts.target_weights == "gguf":
        return True   # GGUF's 4-bit blocks live in our kernel only (options._openvino_attention checked it is usable)
    if opts.target_kernel is not None:
        return opts.target_kernel == "ours"
    from ..kernels.library import status
    return status().available and all(p.target.device.upper() == "CPU" for p in profiles)


def target_parts(target: SourceModel, model, boundaries: list[int], opts: ExportOptions,
                 attention: str = "eager", openvino: bool = False, kernel: bool = False) -> list[tuple]:
    """(name, module, source, layers, weights) of every target graph: a segment between consecutive exit
    layers (fused or traced), the head, and the optional cheaper exit head. `openvino`: fused segments are
    OpenVINO-native (`kernel`: their int4 MatMuls run our kernel)."""
    n = target.shape.num_layers
    cuts = [0, *boundaries, n]
    native = openvino and attention == "fused"

    def segment(a, b):
        if native:
            return OvSegment(target, model, range(a, b), opts.max_context, opts.target_weights, kernel)
        if attention == "fused":   # int8/int4 targets keep their token table at int8 (GatherBlockQuantized)
            return FusedSegment(target, model, range(a, b), opts.max_context,
                                opts.target_weights in QUANTIZED_EMBEDDING)
        return TargetSegment(target.arch, model, a, b)
    parts = [(f"target_seg{i}", segment(a, b), target, range(a, b), opts.target_weights)
             for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    if native:
        head = OvHead(target, model, opts.kappa, opts.target_weights, kernel)
    elif opts.target_weights == "gguf":
        head = FusedHead(target, model, opts.kappa)
    else:
        head = TargetHead(target.arch, model, opts.kappa)
    parts.append(("target_head", head, target, range(n, n), opts.target_weights))
    if EXIT_HEAD_FORMATS[opts.exit_head_weights]:
        exit_head = (OvHead(target, model, opts.kappa, opts.exit_head_weights, False) if native
                     else TargetHead(target.arch, model, opts.kappa))
        parts.append(("exit_head", exit_head, target, range(n, n), opts.exit_head_weights))
    return parts


def _export_parts(parts: list[tuple], stage: Path, step, kappa: int, openvino: bool = False) -> dict[str, GraphEntry]:
    """Trace each part to ONNX, quantize its weights if asked (ORT MatMulNBits, or NNCF into OpenVINO IR
    when `openvino`: the profile runs the target there), and describe it for the manifest."""
    graphs = {}
    for name, module, source, layers, weights in parts:
        what = f"layers {layers.start}..{layers.stop - 1}" if len(layers) else "final norm + LM head"
        how = ", fused" if isinstance(module, BUILT) else ""
        how += ", our 4-bit kernel" if getattr(module, "kernel", False) else ""
        suffix = "xml" if openvino else "onnx"
        with step(f"exporting {name}.{suffix} ({what}, {weights}{how})"):
            if isinstance(module, (OvSegment, OvHead)):
                path = module.build(stage / f"{name}.xml")
                graphs[name] = _graph_entry(stage, path, layers, "openvino", weights=weights)
                continue
            if isinstance(module, (FusedSegment, FusedHead)):
                path = module.build(stage / f"{name}.onnx")
            else:
                part = "draft" if name == "draft" else ("target_head" if "head" in name else "target_segment")
                inputs, outputs = graph_io(part, source.shape, layers, kappa)
                path = export_graph(module, inputs, outputs, source.shape, stage / f"{name}.onnx")
            if openvino:
                path = convert_target_graph(path, weights)
                graphs[name] = _graph_entry(stage, path, layers, "openvino", weights=weights)
                continue
            bits = WEIGHT_BITS[weights]
            if bits:
                quantize_matmuls(path, bits)
            elif weights == "fp16":
                convert_to_fp16(path)
            graphs[name] = _graph_entry(stage, path, layers, weights=weights)
    return graphs


def draft_graph_of(profile: Profile) -> str:
    """The draft graph a profile runs: explicit-K/V ONNX on ONNX Runtime, the static IR on a static (NPU)
    draft, else the stateful IR (runtimes/loader.draft_graph_name reads the same rule from a manifest)."""
    if profile.draft.backend == "onnxruntime":
        return "draft"
    return "draft_static" if profile.draft.static else "draft_stateful"


def artifact_profiles(opts: ExportOptions) -> list[Profile]:
    """The profile the artifact records, then the others it is exported for. Target graphs are built for
    the first; the others must run the target on the same runtime."""
    profiles = [load_profile(opts.profile), *(load_profile(p) for p in opts.also_profiles)]
    for other in profiles[1:]:
        if other.target.backend != profiles[0].target.backend:
            raise MirrorDeployError(f"profiles {profiles[0].name} and {other.name} run the target on different "
                                    f"runtimes ({profiles[0].target.backend}, {other.target.backend}), and one "
                                    "artifact holds one set of target graphs", "export one artifact per target runtime")
    return profiles


def _export_draft(draft: SourceModel, opts: ExportOptions, needed: set[str], stage: Path, step) -> dict[str, GraphEntry]:
    """The draft graphs the artifact's profiles run (`draft_graph_of`): only those are written. The static
    IR is converted from the explicit-K/V ONNX, which is then kept only if a profile runs it."""
    graphs: dict[str, GraphEntry] = {}
    nd = draft.shape.num_layers
    # A GGUF draft's stateful graph is traced without its weights, which go in by name from the file
    # (gguf_draft.py): the fp32 weights are loaded only for a graph that needs them.
    weightless = "draft_stateful" in needed and opts.draft_weights == "gguf" and gguf_draft.applies(draft)
    draft_model = None
    if needed & {"draft", "draft_static"} or ("draft_stateful" in needed and not weightless):
        with step(f"loading draft {draft.path.name}"):
            draft_model = draft.load_model()
    if needed & {"draft", "draft_static"}:
        with grouped_attention(draft_model, draft.arch):
            graphs.update(_export_parts([("draft", FullModel(draft.arch, draft_model, 0, nd, draft_top_m(draft.shape)),
                                          draft, range(0, nd), "fp32")], stage, step, opts.kappa))
    scratch = Path(tempfile.mkdtemp(prefix="stateful-", dir=stage))
    try:
        weights_in = None
        if "draft_stateful" in needed:
            with step("tracing the stateful draft" + (" (weights left out)" if weightless else "")):
                if weightless:
                    traced, names = gguf_draft.trace_weightless(scratch, draft)
                    weights_in = partial(gguf_draft.keep_gguf_weights, weight_names=names,
                                         gguf_file=draft.gguf_weights, draft=draft)
                else:
                    traced = trace_stateful_draft(scratch, draft, draft_model)
        del draft_model   # the PyTorch weights go before OpenVINO loads the traced ones
        draft.release()
        if "draft_stateful" in needed:
            how = "gguf weights, by name" if weightless else f"{opts.draft_weights} weights"
            with step(f"compiling the stateful draft to OpenVINO IR ({how})"):
                xml = convert_stateful_draft(traced, stage / "draft_stateful.xml", opts.draft_weights,
                                             draft.gguf_weights, weights_in)
                graphs["draft_stateful"] = _graph_entry(stage, xml, range(0, nd), "openvino", weights=opts.draft_weights)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if "draft_static" in needed:
        with step(f"compiling the static (NPU) draft to OpenVINO IR ({opts.draft_weights} weights)"):
            xml = convert_draft(stage / "draft.onnx", stage / "draft_static.xml", opts.draft_weights,
                                draft_static_shapes(draft, opts), draft.gguf_weights)
            graphs["draft_static"] = _graph_entry(stage, xml, range(0, nd), "openvino", True, opts.draft_weights)
    if "draft" not in needed and "draft" in graphs:
        for f in graph_files(stage / "draft.onnx"):
            f.unlink()
        del graphs["draft"]
    return graphs


def _source_records(target: SourceModel, draft: SourceModel | None) -> tuple[dict, dict | None]:
    """The manifest's records of both models; a learned draft's (learn-draft) must name this target."""
    from ..learned_draft import read_provenance, require_taught_by
    target_record = target.describe()
    if draft is None:
        return target_record, None
    draft_record = draft.describe()
    learned = read_provenance(draft.path)   # None for an ordinary checkpoint or a .gguf
    require_taught_by(learned, target_record["weights_sha256"], target.path, draft.path)
    if learned is not None:
        draft_record["learned"] = learned
    return target_record, draft_record


def export_artifact(target_path, draft_path, out, opts: ExportOptions, console: Console | None = None) -> Path:
    """`draft_path` None writes a target-only artifact: the target's graphs, tokenizer and manifest,
    which serve `ar` and `lookup` (prompt lookup needs no draft model)."""
    console = console or Console(stderr=True)
    out = Path(out).expanduser()
    profiles = artifact_profiles(opts)
    profile: Profile = profiles[0]
    target = open_source(target_path, "target")
    draft = open_source(draft_path, "draft") if draft_path is not None else None
    exit_layer, boundaries = validate(target, draft, opts, out)
    if opts.target_weights == "gguf":
        target.gguf_weights = gguf_file_of(target.path, "target")
    if draft is not None and opts.draft_weights == "gguf":
        draft.gguf_weights = gguf_file_of(draft.path, "draft")
    target_record, draft_record = _source_records(target, draft)   # before any work: a mismatched learned draft
    attention = target_attention(target, profile, opts)
    if attention == "eager":
        # Fused segments compute a row with the same bits in a verify window as alone (fused_target.py,
        # tests/test_gguf.py); traced ones use kernels whose sums depend on the rows in the call.
        console.print("[yellow]note:[/] traced (eager) target segments: speculative output equals this artifact's "
                      "autoregressive output except where a verify window and a single step resolve a near-tie "
                      "differently; fused segments (ONNX Runtime CPU profiles) are exact")
    if opts.target_weights == "fp16" and profile.target.backend == "onnxruntime" and profile.target.device == "cpu":
        console.print("[yellow]note:[/] --target-weights fp16 is for GPUs: ONNX Runtime's CPU provider runs fp16 "
                      "graphs through fp32 casts, slower than fp32 (fine for checks, not for speed)")
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with staging_folder(out) as stage, Progress(*columns, console=console, transient=True) as progress:
        @contextmanager
        def step(text):
            """A spinner while it runs, then one line with its time (readable in CI logs too)."""
            task, t0 = progress.add_task(text, total=1), time.perf_counter()
            yield
            progress.remove_task(task)
            console.print(f"[green]✓[/] {text} [dim]{time.perf_counter() - t0:.1f} s[/]")

        # One model in memory at a time: the target's graphs are written and its weights freed before the
        # draft loads (the peak was both models plus an exporter's copies).
        with step(f"loading target {target.path.name}"):
            target_tok = target.load_tokenizer()
            if draft is not None:
                same_vocabulary(target, draft, target_tok)
            target_model = (load_gguf_model(target.gguf_weights, target.config) if target.gguf_weights
                            else target.load_model())
            kept = published_table(target_model, target.arch, target.path) if attention == "fused" else None
        if kept:
            console.print(f"token table: {kept}")
        openvino = profile.target.backend == "openvino"
        kernel = target_kernel(opts, profiles, attention)
        graphs = _export_parts(target_parts(target, target_model, boundaries, opts, attention, openvino, kernel),
                               stage, step, opts.kappa, openvino=openvino)
        del target_model
        target.release()
        if draft is not None:
            graphs.update(_export_draft(draft, opts, {draft_graph_of(p) for p in profiles}, stage, step))

        with step("writing tokenizer and manifest"):
            if target_tok is not None:
                target_tok.save_pretrained(stage / "tokenizer")
            manifest = Manifest(
                target=target_record, draft=draft_record, exit_layer=exit_layer,
                exit_layers=boundaries, target_weights=opts.target_weights, kappa=opts.kappa,
                gamma=opts.gamma, max_context=opts.max_context, branch_batch=opts.branch_batch,
                profile=profile.to_dict(), graphs=graphs, tokenizer="tokenizer" if target_tok is not None else None,
                target_attention=attention)
            manifest.save(stage)
    targets = [n for n in graphs if not n.startswith("draft")]
    for p in profiles:
        uses = targets + ([draft_graph_of(p)] if draft is not None else [])
        console.print(f"profile {p.name} runs: {', '.join(uses)}")
    return out
