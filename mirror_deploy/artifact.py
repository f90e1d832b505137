"""The deploy artifact: `manifest.json` and the files it lists, with hashes checked on load."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import MirrorDeployError

SCHEMA_VERSION = 3   # 2: the target as layer segments + one head; 3: target_attention (fused | eager)
READABLE_SCHEMAS = (2, 3)   # a version-2 manifest is an eager (traced) target
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class GraphEntry:
    file: str
    format: str                      # onnx | openvino
    sha256: dict[str, str]           # every file of the graph (side files too) -> hash
    inputs: list[dict]
    outputs: list[dict]
    layers: list[int]                # [first, stop) decoder layers inside
    static: bool = False
    weights: str = "fp32"            # weight format of this graph: fp32 | fp16 | int8 | int4


@dataclass
class Manifest:
    target: dict
    draft: dict | None               # None: a target-only artifact (modes ar and lookup)
    exit_layer: int                  # the default exit layer of a run
    exit_layers: list[int]           # segment boundaries: the exit layers a run may choose
    target_weights: str
    kappa: int                       # the heads' top-κ width: the most a run may use
    gamma: int
    max_context: int
    branch_batch: int
    profile: dict
    graphs: dict[str, GraphEntry]
    tokenizer: str | None = "tokenizer"
    tuning: dict | None = None       # {"file": "tuning.json", "sha256": ...} once `mirror-deploy tune` ran
    target_attention: str = "eager"  # fused: GQA segments with in-place K/V; eager: traced HF layers
    # The draft's head cut to its V most frequent tokens (export/vocab_cut.py, tuning/vocab.py):
    # {"file": ids .npy (hashed in each cut graph's sha256), "size": V, "graphs": [cut graph names], ...}
    draft_vocab: dict | None = None
    # Speculative streams learned for the draft (tuning/streams.py, `learn-streams`): {"streams": S,
    # "file": block weights .npz (hashed in each streams graph's sha256), "graphs": {draft graph: its
    # "<name>_streams" variant}, "acceptance": held-out acceptance per window position, ...}
    draft_streams: dict | None = None
    schema_version: int = SCHEMA_VERSION
    created_by: str = field(default="mirror-deploy")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        data = dict(data)
        data["graphs"] = {k: GraphEntry(**v) for k, v in data["graphs"].items()}
        return cls(**data)

    @property
    def has_draft(self) -> bool:
        return self.draft is not None

    def vocab_cut(self, graph: str) -> bool:
        """Does `graph`'s head score only the draft_vocab ids?"""
        return self.draft_vocab is not None and graph in self.draft_vocab.get("graphs", ())

    def stream_count(self, graph: str) -> int:
        """S of a draft graph with speculative streams (its stream_logits are [1, rows, S, V]); 0: none."""
        for spec in self.graphs[graph].outputs:
            if spec["name"] == "stream_logits":
                return int(spec["shape"][2])
        return 0

    def stream_files(self) -> set[str]:
        """Files the streams graphs hash (their IRs, the block's weights, a cut head's ids)."""
        graphs = (self.draft_streams or {}).get("graphs", {}).values()
        return {f for g in graphs if g in self.graphs for f in self.graphs[g].sha256}

    def target_segments(self) -> list[str]:
        """Graph names of the target's layer segments, first layer first."""
        names = [k for k in self.graphs if k.startswith("target_seg")]
        return sorted(names, key=lambda k: self.graphs[k].layers[0])

    def save(self, folder: Path) -> Path:
        path = folder / MANIFEST
        path.write_text(self.to_json())
        return path


def read_manifest(folder: Path) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise MirrorDeployError(f"artifact folder {folder} does not exist",
                                "pass the --out folder of a `mirror-deploy export` run")
    if not path.is_file():
        raise MirrorDeployError(f"{folder} has no {MANIFEST}: it is not a mirror-deploy artifact",
                                "export one with `mirror-deploy export TARGET --draft DRAFT --out DIR`")
    try:
        data = json.loads(path.read_text())
        manifest = Manifest.from_dict(data)
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as err:
        raise MirrorDeployError(f"{path} is damaged or was edited by hand ({err})",
                                "re-export the artifact with `mirror-deploy export ... --force`") from None
    if manifest.schema_version not in READABLE_SCHEMAS:
        raise MirrorDeployError(f"{path} has schema version {manifest.schema_version}, this mirror-deploy "
                                f"reads versions {', '.join(map(str, READABLE_SCHEMAS))}", "re-export the artifact")
    return manifest


def verify_files(folder: Path, manifest: Manifest) -> list[tuple[str, str, str]]:
    """(graph, file, problem) for each listed file that is missing or whose hash differs."""
    problems = []
    for name, graph in manifest.graphs.items():
        for file, expected in graph.sha256.items():
            path = Path(folder) / file
            if not path.is_file():
                problems.append((name, file, "missing"))
            elif sha256_file(path) != expected:
                problems.append((name, file, "hash differs from the manifest (edited or truncated)"))
    return problems


def require_intact(folder: Path, manifest: Manifest) -> None:
    problems = verify_files(folder, manifest)
    if problems:
        listed = "; ".join(f"{f} ({why})" for _, f, why in problems)
        raise MirrorDeployError(f"artifact {folder} is damaged: {listed}",
                                "re-export it with `mirror-deploy export ... --force`")
