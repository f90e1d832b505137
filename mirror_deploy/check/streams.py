"""`check` rows for the draft's speculative streams (`learn-streams`, export/draft_streams.py).

- manifest: every streams graph is listed, hashes the block's weights, and has S stream positions;
- weights: the block's arrays have the draft's width (W_in [2d, d], W_out [d, d]) and are finite;
- parity: the streams graph's own outputs equal the plain graph's on the same calls (the streams are
  added after the head and must not change the draft's own proposals), and its stream outputs are
  finite, S wide, and name tokens of the vocabulary (of the cut head's, where it is cut).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact import Manifest
from .report import CheckReport
from ..errors import MirrorDeployError
from ..targets import Profile

CHECK = "streams"


def manifest_rows(folder: Path, m: Manifest, report: CheckReport) -> list[tuple[str, str]]:
    """Check the record; returns the (plain, streams) graph pairs worth loading."""
    info = m.draft_streams
    pairs = []
    for plain, streamed in info.get("graphs", {}).items():
        entry = m.graphs.get(streamed)
        problems = []
        if plain not in m.graphs or entry is None:
            problems.append(f"{plain} or {streamed} is not a graph of the manifest")
        else:
            if info.get("file") not in entry.sha256:
                problems.append(f"it does not hash the block's weights ({info.get('file')})")
            if m.stream_count(streamed) != info.get("streams"):
                problems.append(f"it has {m.stream_count(streamed)} stream positions, the record says {info.get('streams')}")
        report.add(CHECK, streamed, not problems, "; ".join(problems) or
                   f"{info['streams']} stream(s) after {plain}; held-out acceptance per window position "
                   + "/".join(f"{a:.2f}" for a in info.get("acceptance", [])))
        if not problems:
            pairs.append((plain, streamed))
    return pairs


def weight_rows(folder: Path, m: Manifest, intact: set[str], report: CheckReport) -> bool:
    file = m.draft_streams.get("file")
    if not all(g in intact for g in m.draft_streams.get("graphs", {}).values()):
        report.add(CHECK, file, False, "a streams graph or the block's weights are missing or do not match their "
                   "hash (see the hash rows)", fix="run `mirror-deploy learn-streams` again")
        return False
    d = m.draft["hidden_size"]
    with np.load(Path(folder) / file) as data:
        shapes = {k: data[k].shape for k in data.files}
        finite = all(np.isfinite(data[k]).all() for k in data.files)
    ok = shapes == {"w_in": (2 * d, d), "w_out": (d, d)} and finite
    report.add(CHECK, file, ok, f"W_in {shapes.get('w_in')}, W_out {shapes.get('w_out')} for hidden size {d}"
               + ("" if finite else "; not finite"))
    return ok


def parity_rows(folder: Path, m: Manifest, prof: Profile, pairs: list[tuple[str, str]], report: CheckReport,
                seed: int = 0) -> None:
    from ..decoding.draft import DraftRunner
    from ..runtimes.kv import COMMITTED
    from ..runtimes.loader import draft_graph_name, open_draft
    try:
        used = draft_graph_name(m, prof)
    except MirrorDeployError as err:
        report.skip(CHECK, "parity", f"the profile's draft does not load ({err.problem})")
        return
    for plain, streamed in pairs:
        if plain != used:
            report.skip(CHECK, streamed, f"profile {prof.name} runs {used}, not {plain}")
            continue
        rng = np.random.default_rng(seed)
        tokens = [int(t) for t in rng.integers(0, m.draft["vocab_size"], 12)]
        outs = {}
        try:
            for name, streams in ((plain, False), (streamed, True)):   # as a run opens them
                runner = DraftRunner(open_draft(folder, m, prof, streams), m)
                runner.prefill(tokens[:8])
                first = runner.cache.used
                outs[name] = runner.call(tokens[8:], [COMMITTED] + list(range(first, first + 3)), list(range(8, 12)))
        except Exception as err:   # a runtime refusing the graph is the finding
            report.add(CHECK, streamed, False, f"{type(err).__name__}: {err}")
            continue
        base, new = outs[plain], outs[streamed]
        problems = []
        if not np.allclose(base.logits, new.logits, rtol=1e-4, atol=1e-4) or not np.array_equal(base.top_ids, new.top_ids):
            problems.append("its own logits or top ids differ from the plain graph's")
        logits, ids, _ = new.streams or (None, None, None)
        vocab = m.draft["vocab_size"]
        if logits is None or logits.shape[1] != m.stream_count(streamed) or not np.isfinite(logits).all():
            problems.append("stream logits are missing, of the wrong width, or not finite")
        elif ids.min() < 0 or ids.max() >= vocab or (new.vocab_ids is not None and not np.isin(ids, new.vocab_ids).all()):
            problems.append("stream top ids fall outside the head's vocabulary")
        report.add(CHECK, f"{streamed} parity", not problems, "; ".join(problems) or
                   f"own outputs equal {plain}'s on 4 tree rows; stream outputs {tuple(logits.shape)} finite, "
                   "ids in the head's vocabulary")


def check_streams(folder: Path, m: Manifest, prof: Profile, intact: set[str], report: CheckReport,
                  parity: bool, seed: int = 0) -> None:
    if not m.draft_streams:
        return
    pairs = manifest_rows(folder, m, report)
    if not weight_rows(folder, m, intact, report) or not pairs:
        return
    if parity:
        parity_rows(folder, m, prof, pairs, report, seed)
    else:
        report.skip(CHECK, "parity", "--skip-parity given")
