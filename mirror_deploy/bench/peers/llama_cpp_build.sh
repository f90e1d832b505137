#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-bench from the source the llama-cpp-python sdist vendors, and
# install them with its HF-to-GGUF converter (convert_hf_to_gguf.py, conversion/, gguf-py/) into
# $MIRROR_DEPLOY_LLAMA_CPP (default ${MIRROR_DEPLOY_CACHE:-~/.cache/mirror-deploy}/llama.cpp/$VERSION). Built in a temp folder beside it and
# renamed into place last: a failed build leaves nothing that looks complete. Usage: llama_cpp_build.sh [PIP]
set -euo pipefail
VERSION=0.3.36
PIP=${1:-pip}
CACHE=${MIRROR_DEPLOY_CACHE:-$HOME/.cache/mirror-deploy}
DEST=${MIRROR_DEPLOY_LLAMA_CPP:-$CACHE/llama.cpp/$VERSION}
JOBS=${JOBS:-2}

if [ -x "$DEST/bin/llama-server" ]; then echo "llama.cpp already built: $DEST"; exit 0; fi
mkdir -p "$(dirname "$DEST")"
WORK=$(mktemp -d "$(dirname "$DEST")/.$(basename "$DEST").partial-XXXXXX")
trap 'rm -rf "$WORK"' EXIT

"$PIP" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK/dl"
tar xzf "$WORK"/dl/llama_cpp_python-$VERSION.tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$SRC/build" -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
      -DBUILD_SHARED_LIBS=OFF
cmake --build "$SRC/build" -j"$JOBS" --target llama-server llama-bench

OUT="$WORK/out"
mkdir -p "$OUT/bin"
cp "$SRC/build/bin/llama-server" "$SRC/build/bin/llama-bench" "$OUT/bin/"
cp "$SRC/convert_hf_to_gguf.py" "$OUT/"
cp -r "$SRC/conversion" "$OUT/conversion"
cp -r "$SRC/gguf-py" "$OUT/gguf-py"
"$OUT/bin/llama-server" --version > "$OUT/VERSION" 2>&1 || true
mv -T "$OUT" "$DEST"
echo "llama.cpp built: $DEST"
