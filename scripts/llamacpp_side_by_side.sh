#!/usr/bin/env bash
# llama.cpp next to herd on THIS machine, same random model (outside CI; ~30-40 min on 2 cores,
# most of it building llama.cpp once — later runs reuse the build).
#
#   scripts/llamacpp_side_by_side.sh                 # build (once), convert, bench llama.cpp, bench herd
#   WORK=/tmp/x THREADS=2 scripts/llamacpp_side_by_side.sh
#   SKIP_HERD=1 scripts/llamacpp_side_by_side.sh    # llama.cpp only
#   CONVERT_ONLY=1 scripts/llamacpp_side_by_side.sh # model + GGUF files only (no build, no bench)
#
# 1. downloads the llama-cpp-python sdist (it vendors the whole llama.cpp tree: sources,
#    convert_hf_to_gguf.py, gguf-py) with pip, builds llama-bench with cmake (-DGGML_NATIVE=ON, CPU);
# 2. saves the random 552M-total / 123M-active Llama 4 of benchmarks/decode.py (same config, seed 0,
#    bf16) as a Hugging Face Llama4ForCausalLM directory with herd.save_model;
# 3. converts it to GGUF BF16 and Q8_0 with llama.cpp's own converter. The model has no tokenizer
#    (random weights, vocab 50,257), so the converter is given a synthetic byte-level BPE vocabulary
#    of that size (256 byte tokens + 50,001 two-byte merges); llama-bench never tokenizes text;
# 4. runs `llama-bench -t $THREADS` on both files (prefill 512 for BF16, decode 128 for both), then
#    benchmarks/vs_llamacpp.py: herd and llama-bench decoding in turns, round by round, with the
#    median of each round's ratio (this machine's speed drifts by tens of percent within minutes).
#    All under /tmp/herd-bench.lock, so other timing runs do not overlap.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
WORK="${WORK:-/tmp/herd-llamacpp}"
THREADS="${THREADS:-2}"
JOBS="${JOBS:-2}"
LOCK="${LOCK:-/tmp/herd-bench.lock}"
mkdir -p "$WORK"
cd "$WORK"

# ----- 1. llama.cpp from the llama-cpp-python sdist -------------------------------------------------
if ! ls llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
  "$PY" -m pip download --no-binary :all: --no-deps llama-cpp-python -d "$WORK"
fi
SDIST="$(ls llama_cpp_python-*.tar.gz | sort -V | tail -1)"
SRC="$WORK/${SDIST%.tar.gz}"
[ -d "$SRC" ] || tar xzf "$SDIST"
LCPP="$SRC/vendor/llama.cpp"
BENCH="$LCPP/build/bin/llama-bench"
if [ ! -x "$BENCH" ] && [ -z "${CONVERT_ONLY:-}" ]; then
  nice -n 10 cmake -S "$LCPP" -B "$LCPP/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF
  nice -n 10 cmake --build "$LCPP/build" --target llama-bench -j "$JOBS"
fi
echo "llama.cpp: $SDIST $(grep -o 'ggml commit: *[0-9a-f-]*' "$LCPP/build/CMakeCache.txt" 2>/dev/null || true)"

# ----- 2. the model (benchmarks/decode.py's config, seed 0) as a Hugging Face directory --------------
HF="$WORK/model-hf"
if [ ! -f "$HF/model.safetensors" ]; then
  (cd "$ROOT/benchmarks" && "$PY" - "$HF" <<'EOF'
import sys, torch, herd
from decode import model_config
model = herd.build_model(model_config(False), dtype=torch.bfloat16, seed=0)
herd.save_model(model, sys.argv[1])
print("saved", sys.argv[1])
EOF
  )
fi

# ----- 3. GGUF BF16 and Q8_0 ---------------------------------------------------------------------
convert() {  # convert OUTTYPE FILE: llama.cpp's converter with a synthetic vocabulary
  PYTHONPATH="$LCPP/gguf-py:$LCPP" "$PY" - "$HF" "$1" "$2" "$LCPP" <<'EOF'
import sys
sys.argv = [f"{sys.argv[4]}/convert_hf_to_gguf.py", sys.argv[1], "--outtype", sys.argv[2], "--outfile", sys.argv[3]]
import json
import convert_hf_to_gguf as conv
from conversion.llama import Llama4Model

def synthetic_vocab(self):
    """GPT-2 style byte-level BPE of exactly vocab_size tokens: 256 byte tokens, then merges of two."""
    n = self.hparams["vocab_size"]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, k = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + k); k += 1
    base = [chr(c) for c in cs]  # bytes_to_unicode, as GPT-2
    tokens, merges = list(base), []
    for a in base:
        for b in base:
            if len(tokens) == n:
                break
            tokens.append(a + b); merges.append(f"{a} {b}")
    w = self.gguf_writer
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens); w.add_token_types([1] * n); w.add_token_merges(merges)
    w.add_bos_token_id(self.hparams.get("bos_token_id", 0)); w.add_eos_token_id(self.hparams.get("eos_token_id", 1))
    w.add_add_bos_token(False)

Llama4Model.set_vocab = synthetic_vocab
conv.main()
EOF
}
for t in bf16 q8_0; do
  [ -f "$WORK/model-$t.gguf" ] || convert "$t" "$WORK/model-$t.gguf"
done

[ -n "${CONVERT_ONLY:-}" ] && { echo "converted: $(ls "$WORK"/*.gguf)"; exit 0; }

# ----- 4. the numbers ----------------------------------------------------------------------------
echo
echo "## llama.cpp on this machine ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $THREADS threads)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
# prefill 512 and decode 128 of the BF16 file (Q8_0's prefill dies with SIGILL in its AMX int8 path
# on this VM, so Q8_0 is measured by decode only: -p 0)
flock "$LOCK" "$BENCH" -m "$WORK/model-bf16.gguf" -t "$THREADS" -p 512 -n 128 -o md | tee "$WORK/llama-bench.md"
flock "$LOCK" "$BENCH" -m "$WORK/model-q8_0.gguf" -t "$THREADS" -p 0 -n 128 -o md | tee -a "$WORK/llama-bench.md"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ -z "${SKIP_HERD:-}" ]; then
  echo
  echo "## herd and llama.cpp taking turns (benchmarks/vs_llamacpp.py): decode at batch 1"
  cd "$ROOT/benchmarks" && flock "$LOCK" "$PY" vs_llamacpp.py --llama-bench "$BENCH" \
    --gguf-bf16 "$WORK/model-bf16.gguf" --gguf-q8 "$WORK/model-q8_0.gguf" --rounds "${ROUNDS:-7}" --tokens 128 \
    | tee "$WORK/vs-llamacpp.txt"
fi
