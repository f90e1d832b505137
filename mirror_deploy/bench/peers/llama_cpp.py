"""llama.cpp as a peer: its `llama-server` (built by `make llama-cpp` from the source the llama-cpp-python
0.3.36 sdist vendors) over GGUF files, the target alone or speculative with the draft (`draft-simple`).

The GGUFs: a model pulled from our registry (its folder has source.json) runs the registry's own GGUF
(its published quantization, Q4_K_M for the Qwen2.5-Coder pair), as a llama.cpp user would; a `.gguf`
path runs as is; any other Hugging Face folder is converted once to an f32 GGUF with the vendored
convert_hf_to_gguf.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ...errors import MirrorDeployError
from ...models import cache_dir, published_gguf
from ..methods import MethodRun
from .common import build_once, cache_entry, greedy_only, per_call, run_step

LLAMA_CPP_VERSION = "0.3.36"   # of llama-cpp-python, whose sdist vendors the llama.cpp source we build


def llama_cpp_dir() -> Path:
    """Where `make llama-cpp` installs llama.cpp: $MIRROR_DEPLOY_LLAMA_CPP, else
    <mirror-deploy cache>/llama.cpp/0.3.36 (bin/llama-server, bin/llama-bench, the GGUF converter)."""
    return Path(os.environ.get("MIRROR_DEPLOY_LLAMA_CPP") or cache_dir() / "llama.cpp" / LLAMA_CPP_VERSION)


def _built(path: str) -> Path:
    root = llama_cpp_dir()
    if not (root / path).exists():
        raise MirrorDeployError(f"llama.cpp is not built: no {root / path}",
                                f"make llama-cpp (builds llama-server from the llama-cpp-python {LLAMA_CPP_VERSION} "
                                "sdist, 4-10 min on two cores; MIRROR_DEPLOY_LLAMA_CPP sets where)")
    return root / path


# The vendored convert_hf_to_gguf.py, run with its own gguf-py and conversion/ first on the path. With a
# pre-tokenizer name, a tokenizer llama.cpp does not recognise (the tests' tiny ones) is written under
# that name instead of failing: the peer sends token ids, so llama.cpp's text tokenizer is never used.
_CONVERT = """import runpy, sys
root, pre, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path[:0] = [root, root + "/gguf-py"]
if pre:
    from conversion import base
    known = base.TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return pre
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [root + "/convert_hf_to_gguf.py", *argv]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert_to_gguf(model_dir, cache=None, pre_tokenizer: str | None = None) -> Path:
    """An f32 GGUF of the Hugging Face checkpoint `model_dir`, converted once into `cache` (default
    <mirror-deploy cache>/peers) by llama.cpp's own converter; `pre_tokenizer` names the BPE
    pre-tokenizer of a tokenizer the converter does not recognise (else that is an error)."""
    converter = _built("convert_hf_to_gguf.py").parent
    try:
        __import__("sentencepiece")   # the converter imports it even for BPE tokenizers
    except ImportError as e:
        raise MirrorDeployError(f"llama.cpp's GGUF converter needs sentencepiece ({e})",
                                "pip install -e '.[peers]' (sentencepiece is in the peers extra)") from e
    out = cache_entry(cache, "gguf-f32" + (f"-pre-{pre_tokenizer}" if pre_tokenizer else ""), model_dir)

    def build(temps: dict[int, Path]) -> None:
        run_step([sys.executable, "-c", _CONVERT, str(converter), pre_tokenizer or "", str(model_dir),
                  "--outtype", "f32", "--outfile", str(temps[0] / "model.gguf")], f"convert_hf_to_gguf on {model_dir}")

    return build_once([out], build)[0] / "model.gguf"


def gguf_for(model_path, cache=None) -> Path:
    """The GGUF llama.cpp runs for a manifest's model path: the path itself if it is a .gguf, the
    registry's own GGUF for a model pulled from the registry, else an f32 conversion of the folder."""
    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    return published_gguf(path) or convert_to_gguf(path, cache)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCpp:
    """`llama-server` on 127.0.0.1 with one slot: `target_gguf` alone, or speculative with `draft_gguf`
    (`--spec-type draft-simple`, up to `draft_max` drafted tokens a step), `threads` threads per model.

    Greedy (`temperature` 0, `top_k` 1) on our token ids, with no prompt cache between calls (neither the
    slot's, `cache_prompt` false, nor the server's RAM copy of past prompts, `--cache-ram 0`). To yield
    exactly max_new_tokens it is sent `ignore_eos`, which in llama.cpp masks the end-of-generation tokens
    (logit bias -inf) rather than generating past them: where greedy would pick one, its text departs from
    the other methods' from there on; the work per token is the same. Timing: `prefill_seconds` is the
    server's prompt time (to the first new token), `seconds` the rest of the call's wall time; the figures
    add the server's own decode speed (`server_tok_s`, timings.predicted_per_second) and, speculative,
    its drafted and accepted tokens (target calls derived: tokens - accepted)."""

    def __init__(self, target_gguf, draft_gguf=None, threads: int = 1, draft_max: int = 4, context: int = 2048,
                 start_timeout_s: float = 300.0, extra_args: tuple[str, ...] = ()):
        server = _built("bin/llama-server")
        self.speculative, self.threads = draft_gguf is not None, threads
        self.name = f"llama-cpp{'-sd' if self.speculative else ''}@{threads}t"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(server), "-m", str(target_gguf), "-c", str(context), "-t", str(threads), "-tb", str(threads),
               "-np", "1", "--no-warmup", "--cache-ram", "0", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.speculative:
            cmd += ["-md", str(draft_gguf), "--spec-type", "draft-simple", "-td", str(threads), "-tbd", str(threads),
                    "--spec-draft-n-max", str(draft_max)]
        cmd += list(extra_args)   # any other llama-server flags, e.g. ("--poll", "0")
        fd, log = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        self.log = Path(log)
        with os.fdopen(fd, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MirrorDeployError(f"llama-server exited (code {self.proc.returncode}) while starting:\n"
                                        f"{self._log_tail()}", "check the model files and the flags above")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass   # not listening yet, or 503 while it loads the model
            time.sleep(0.1)
        raise MirrorDeployError(f"llama-server did not come up in {timeout_s:.0f} s:\n{self._log_tail()}",
                                "check the model files, or pass a longer start_timeout_s")

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, seed=0) -> MethodRun:
        greedy_only(self.name, temperature)
        body = {"prompt": [int(t) for t in prompt_ids], "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1,
                "seed": seed, "cache_prompt": False, "ignore_eos": True, "return_tokens": True, "stream": False}
        req = urllib.request.Request(self.url + "/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=3600) as r:
                resp = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise MirrorDeployError(f"llama-server answered {e.code}: {e.read()[:2000]!r}",
                                    "see the request above") from e
        except (urllib.error.URLError, ConnectionError) as e:
            raise MirrorDeployError(f"llama-server failed during a request ({e}):\n{self._log_tail()}",
                                    "see its log above") from e
        total = time.perf_counter() - t0
        tokens, timings = [int(t) for t in resp.get("tokens", [])], resp.get("timings", {})
        if len(tokens) != max_new_tokens:
            raise MirrorDeployError(f"{self.name} returned {len(tokens)} tokens, not {max_new_tokens} "
                                    f"(stop_type {resp.get('stop_type')!r})", "see llama-server's log")
        prefill = min(timings.get("prompt_ms", 0.0) / 1e3, total)
        n = len(tokens)
        figures = per_call(n, n) | {"total_s": total, "server_tok_s": timings.get("predicted_per_second"),
                                    "server_prompt_ms": timings.get("prompt_ms"),
                                    "server_decode_ms": timings.get("predicted_ms")}
        if self.speculative:
            drafted, accepted = int(timings.get("draft_n", 0)), int(timings.get("draft_n_accepted", 0))
            figures |= per_call(n, n - accepted) | {"acceptance": accepted / drafted if drafted else 0.0,
                                                    "accepted_tokens": accepted, "draft_tokens": drafted}
        return MethodRun(tokens, total - prefill, prefill, figures)

    def close(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None
        if getattr(self, "log", None) is not None:
            self.log.unlink(missing_ok=True)
