"""The PyTorch reference an artifact is checked against, rebuilt from the source models its manifest
records: the exporter's own wrapper modules run eagerly (same feeds, call for call, so a difference is
the export or the runtime), and the plain HF forward (what the split graphs must add up to, so a
difference is the wrappers, the caches or the masks)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .artifact import Manifest
from .errors import MirrorDeployError
from .export.graphs import FullModel, TargetHead, TargetSegment
from .export.loading import SourceModel, open_source
from .axes import static_draft_dims
from .export.shapes import draft_top_m, graph_io
from .runtimes.torch_ref import TorchGraph


def open_recorded(manifest: Manifest, role: str, purpose: str = "the parity reference",
                  alternative: str = "or pass --skip-parity to check files and compilation only") -> SourceModel:
    """The source model at the path recorded at export, refused if it changed since."""
    recorded = getattr(manifest, role)
    fix = f"put the {role} model used for the export back at {recorded['path']}" + (f", {alternative}" if alternative else "")
    try:
        source = open_source(recorded["path"], role)
    except MirrorDeployError as err:
        raise MirrorDeployError(f"{role} source model for {purpose}: {err.problem}", fix) from None
    now = source.describe()
    for key in ("config_sha256", "weights_sha256"):
        if now[key] != recorded[key]:
            raise MirrorDeployError(
                f"{role} source model at {recorded['path']} changed since the export ({key} differs)", fix)
    return source


def _torch_graph(module, part: str, source: SourceModel, layers: range, kappa=None) -> TorchGraph:
    # The wrapper takes every input positionally, so feed the full I/O list, not the file's (which
    # may have dropped unused inputs).
    inputs, outputs = graph_io(part, source.shape, layers, kappa)
    return TorchGraph(module, part, [s.name for s in inputs], [s.name for s in outputs])


@dataclass
class Reference:
    manifest: Manifest
    target: SourceModel
    draft: SourceModel | None      # None: a target-only artifact

    @classmethod
    def load(cls, manifest: Manifest) -> "Reference":
        target = open_recorded(manifest, "target")
        draft = open_recorded(manifest, "draft") if manifest.has_draft else None
        for source in (target, draft):
            if source is not None:
                source.load_model()
        return cls(manifest, target, draft)

    def target_graphs(self) -> dict[str, TorchGraph]:
        """The eager wrappers of every target graph, by the artifact's graph names."""
        m, src = self.manifest, self.target
        graphs = {}
        for name in m.target_segments():
            a, b = m.graphs[name].layers
            graphs[name] = _torch_graph(TargetSegment(src.arch, src.model, a, b), "target_segment", src, range(a, b))
        n = src.shape.num_layers
        graphs["target_head"] = _torch_graph(TargetHead(src.arch, src.model, m.kappa), "target_head", src,
                                             range(n, n), m.kappa)
        if "exit_head" in m.graphs:
            graphs["exit_head"] = graphs["target_head"]
        return graphs

    def draft_graph(self, static: bool = False) -> TorchGraph:
        src = self.draft
        n = src.shape.num_layers
        graph = _torch_graph(FullModel(src.arch, src.model, 0, n, draft_top_m(src.shape)), "draft", src, range(n))
        if static:  # feed it the same padded calls as the static graph
            graph.static_dims = static_draft_dims(self.manifest.branch_batch, self.manifest.max_context)
        return graph

    def target_logits(self, ids) -> np.ndarray:
        return _forward(self.target.model, ids).logits[0].numpy()

    def draft_logits(self, ids) -> np.ndarray:
        return _forward(self.draft.model, ids).logits[0].numpy()

    def logit_lens(self, ids, layer: int) -> np.ndarray:
        """Log-probs of the final norm + LM head applied to the hidden state after `layer` layers."""
        src = self.target
        hidden = _forward(src.model, ids, output_hidden_states=True).hidden_states[layer]
        with torch.no_grad():
            logits = src.model.lm_head(src.arch.final_norm_of(src.model)(hidden))
        return torch.log_softmax(logits, dim=-1)[0].numpy()


def _forward(model, ids, **kwargs):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids, np.int64)).reshape(1, -1), use_cache=False, **kwargs)
