#!/usr/bin/env bash
# Everything megamt can check on one CUDA GPU, in about 10 minutes, ending with one summary
# table that names the card:
#
#   1. env              python, torch, CUDA, the card
#   2. install          what the environment lacks (DeepSpeed as a pure-Python wheel, webdataset,
#                       pydantic, hjson, datasets, ..., Liger-Kernel) from a wheel folder, then
#                       megamt itself (with its `triton` GPU extra; flash-attn has no wheel small
#                       enough to carry: SDPA is used), into a site folder of the run (--target;
#                       the environment itself is not changed)
#   3. tests/gpu        pytest tests/gpu (every GPU test there is)
#   4. train_1b         a ~1.1B-parameter Llama built from a config (TinyLlama's shape: hidden
#                       2048, 22 layers, vocabulary 32000), ZeRO-3, bf16, 1 GPU, 4 x 2048-token
#                       packed rows per step on the demo corpus, trained for --train-seconds
#                       (120) after its first step: tokens/s, MFU, peak memory
#   5. bench_kernels    the GPU section of tools/bench_kernels.py (fused per-task loss vs the
#                       unfused reference, vs Liger-Kernel where installed)
#   6. bench_gradients  the GPU section of tools/bench_gradients.py (Triton Gram/combine vs the
#                       copy bandwidth)
#
#   tools/gpu_check.sh [--dry-run | --cpu-rehearsal] [--wheels DIR] [--out DIR] [--train-seconds S]
#   tools/gpu_check.sh --fetch-wheels [--wheels DIR]   # on a machine with PyPI: fill DIR for the GPU machine
#
# --dry-run (any machine, CPU included): every step is resolved -- the commands it would run,
# the wheels it would install for what is missing, the 1B training config written and
# validated by megamt's config loader with its parameter count -- and skipped with a reason.
# --cpu-rehearsal (a CPU machine): every step runs for real at toy sizes -- the install into
# the run's site folder, pytest collecting tests/gpu (its tests skip without CUDA), the training
# driver on a 2-layer model of the same vocabulary in fp32 for --train-seconds (default 10), the
# benchmarks' GPU sections saying they skip -- to rehearse this script itself, not the GPU.
# Per-step time limits (install 45 s, tests/gpu 120 s, train_1b 120 s to its first step plus
# --train-seconds, bench_kernels 90 s, bench_gradients 80 s: 575 s in all) keep the whole check
# within 10 minutes; a step over its limit is killed and reported as such, and the next one runs.
#
# The GPU machine reaches no package registry: --fetch-wheels downloads (or builds, for
# packages published as source only) the wheels of the packages megamt needs beyond that
# machine's image (torch, triton, transformers, numpy, pyarrow, peft, tensorboard ... are
# there) for CPython 3.12 on manylinux x86_64, into DIR (default .whl, to carry along).
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY=0 FETCH=0 REHEARSAL=0 WHEELS="$REPO/.whl" OUT="$REPO/runs/gpu_check" TRAIN_S=
while (( $# )); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --fetch-wheels) FETCH=1 ;;
        --cpu-rehearsal) REHEARSAL=1 ;;
        --wheels) WHEELS="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        --train-seconds) TRAIN_S="$2"; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
TRAIN_S="${TRAIN_S:-$( (( REHEARSAL )) && echo 10 || echo 120)}"

# Import name -> wheel (distribution) name of what megamt needs beyond the GPU image, pinned to
# the versions this project's CI installs. Every module here is checked; a missing one is
# installed from the wheel folder.
NEEDED=(deepspeed:deepspeed==0.19.8 hjson:hjson==3.1.0 pydantic:pydantic==2.14.4
        pydantic_core:pydantic-core==2.50.5 annotated_types:annotated-types==0.8.0
        typing_inspection:typing-inspection==0.4.5 webdataset:webdataset==1.0.2 braceexpand:braceexpand==0.1.7
        datasets:datasets==5.2.0 dill:dill==0.4.1 multiprocess:multiprocess==0.70.19 seqeval:seqeval==1.2.2
        rouge_score:rouge-score==0.1.2 nltk:nltk==3.10.4 liger_kernel:liger-kernel==0.6.4)
# already in the GPU image (KINDS.md); checked, never carried
PRESENT=(torch triton transformers tokenizers numpy yaml tqdm peft tensorboard safetensors matplotlib pyarrow
         pandas xxhash psutil ninja msgpack cpuinfo einops pytest)

if (( FETCH )); then
    mkdir -p "$WHEELS"
    PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    for pair in "${NEEDED[@]}"; do
        spec="${pair#*:}"
        case "$spec" in
            # published as source only (pure Python): build the wheel here
            deepspeed==*|seqeval==*|rouge-score==*) DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "$spec" ;;
            *) "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$WHEELS" "$spec" ;;
        esac || { echo "gpu_check: could not fetch $spec" >&2; exit 1; }
    done
    ls -l "$WHEELS"
    echo "gpu_check: wheels in $WHEELS ($(du -sh "$WHEELS" | cut -f1)); carry it to the GPU machine"
    exit 0
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SITE="$OUT/site"
SUMMARY="$OUT/summary.tsv"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$OUT/torch_extensions}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
# -P: the repository itself is not imported as a package (megamt.kernels lives in kernels/,
# mapped by the installed package): every step runs the installed megamt
PYP=("$PY" -P)
T_ALL=$(date +%s)

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"; }

NOTE=""  # what a skipped step had resolved, for its summary row
# run_step NAME LIMIT_S COMMAND...: runs it (output to $OUT/NAME.log, echoed with a prefix)
# unless this is a dry run or there is no GPU, in which case it says what it would run and why not
run_step() {
    local name="$1" limit="$2"; shift 2
    local log="$OUT/$name.log"
    echo "[$name] $(printf '%q ' "$@")(limit ${limit} s)"
    if [[ -n "$SKIP_REASON" ]]; then
        echo "[$name] skipped: $SKIP_REASON${NOTE:+; $NOTE}"
        record "$name" skipped 0 "$SKIP_REASON${NOTE:+; $NOTE}"
        NOTE=""
        return 0
    fi
    local t0 rc status
    t0=$(date +%s)
    timeout -k 15 "$limit" "$@" > "$log" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124|137) status="timeout (${limit} s)" ;; *) status="failed (exit $rc)" ;; esac
    record "$name" "$status" $(( $(date +%s) - t0 )) "$log"
    tail -n 5 "$log" | sed "s/^/[$name] /"
}

# ---------------------------------------------------------------------------- 1. env
"$PY" - "$OUT/env.json" <<'EOF'
import json, platform, sys
info = {"python": platform.python_version()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(card=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
except ImportError as e:
    info.update(torch=None, cuda_available=False, error=str(e))
json.dump(info, open(sys.argv[1], "w"))
print("[env] " + ", ".join(f"{k}={v}" for k, v in info.items()))
EOF
CUDA="$("$PY" -c 'import json,sys; print(int(bool(json.load(open(sys.argv[1])).get("cuda_available"))))' "$OUT/env.json")"
SKIP_REASON=""
if (( DRY )); then
    SKIP_REASON="dry run$( (( CUDA )) || echo ' (and no CUDA device here)')"
elif (( ! CUDA && ! REHEARSAL )); then
    echo "gpu_check: no CUDA device visible to $PY; on a CPU machine use --dry-run or --cpu-rehearsal" >&2
    exit 2
fi
TINY=()
(( REHEARSAL )) && TINY=(--tiny)

# ---------------------------------------------------------------------------- 2. install
# which modules are there (find_spec: found without importing them)
missing_of() { "$PY" -c 'import importlib.util, sys; print(" ".join(a for a in sys.argv[1:] if importlib.util.find_spec(a.split(":")[0]) is None))' "$@"; }
read -r -a MISSING <<< "$(missing_of "${NEEDED[@]}")"
read -r -a ABSENT <<< "$(missing_of "${PRESENT[@]}")"
echo "[install] missing here: ${MISSING[*]:-nothing}; wheel folder: $WHEELS"
(( ${#ABSENT[@]} )) && echo "[install] WARNING: not importable and not carried: ${ABSENT[*]}"
WHL=()
for pair in "${MISSING[@]}"; do
    spec="${pair#*:}" ; dist="${spec%%==*}"
    found=( "$WHEELS"/"${dist//-/_}"-*.whl )
    if [[ -e "${found[0]}" ]]; then
        WHL+=("${found[0]}")
    elif [[ "$dist" == liger-kernel ]]; then
        echo "[install] liger-kernel: no wheel; bench_kernels runs without the Liger-Kernel comparison"
    else
        echo "[install] $spec: no wheel in $WHEELS (tools/gpu_check.sh --fetch-wheels fills it)"
    fi
done
install_megamt() {  # ARGS: the wheels to install; runs under `timeout`, so in its own bash
    if (( $# )); then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@" || return
    fi
    # megamt itself (no dependency resolution: checked above), built from this checkout
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" "$REPO" || return
    "$PY" -P -c "import deepspeed, webdataset, datasets, megamt.kernels, megamt.trainer; print('megamt from', megamt.__file__)"
}
export -f install_megamt
export PY SITE REPO
NOTE="would install ${#WHL[@]} wheel(s)$( (( ${#WHL[@]} )) && printf ' %s' "${WHL[@]##*/}") and megamt from $REPO"
run_step install 45 bash -c 'install_megamt "$@"' install_megamt "${WHL[@]}"

# ---------------------------------------------------------------------------- 3. tests/gpu
if [[ -n "$SKIP_REASON" ]]; then  # resolved: the tests pytest would run
    NOTE="$("${PYP[@]}" -m pytest -q -p no:cacheprovider --collect-only "$REPO/tests/gpu" 2>&1 | grep -E '^[0-9]+ tests? collected|error' | tail -n 1)"
fi
run_step tests_gpu 120 "${PYP[@]}" -m pytest -q -p no:cacheprovider "$REPO/tests/gpu" -rs

# ---------------------------------------------------------------------------- 4. train_1b
TRAIN_PY="$OUT/train_1b.py"
cat > "$TRAIN_PY" <<'EOF'
"""gpu_check's 1-GPU training run: ~1.1B Llama from a config, ZeRO-3, bf16, demo corpus.
argv: OUT TRAIN_SECONDS [--resolve-only] [--tiny]. Prints one JSON line last.
--tiny (the CPU rehearsal): 2 layers of hidden 64, fp32, 2 x 256-token rows; same vocabulary."""
import json, os, shutil, signal, statistics, subprocess, sys, time
from pathlib import Path

import yaml

out, seconds = Path(sys.argv[1]), float(sys.argv[2])
resolve_only, tiny = "--resolve-only" in sys.argv, "--tiny" in sys.argv
data = out / "train_data"
LLAMA_1B = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                max_position_embeddings=2048, tie_word_embeddings=False)
spec = data / "spec.yaml"
if not spec.exists():
    cmd = [sys.executable, "-P", "-m", "megamt.cli", "demo-corpus", str(data), "--n-train", "300", "--n-val", "8",
           "--seq-len", "2048"]
    print("train_1b: " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
raw = yaml.safe_load(spec.read_text())
raw["model"] = {"from_config": LLAMA_1B, "dtype": "bf16", "attn_implementation": "sdpa"}
rows = 4
if tiny:
    LLAMA_1B.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    raw["model"]["dtype"], raw["data"]["seq_len"], rows = "fp32", 256, 2
raw["train"] = {"run_dir": str(out / "train_run"), "max_steps": 100000, "micro_batch_size": rows, "lr": 1e-4,
                "warmup_steps": 10, "log_every": 1, "save_every": 0, "eval_every": 0, "eval_at_start": False,
                "progress_bar": False, "ds_config": "zero3"}
config = data / "train_1b.yaml"  # beside the spec: its paths are relative to it
config.write_text(yaml.safe_dump(raw, sort_keys=False))

from megamt.config import load_config  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402



def size(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


cfg = load_config(config)  # megamt's own validation of the whole config
mc = dict(cfg.model.from_config)
with torch.device("meta"):
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.for_model(mc.pop("model_type"), **mc)).parameters())
print(f"train_1b: {config} resolved: {size(n_params)} parameters, {cfg.train.micro_batch_size} x "
      f"{cfg.data.seq_len} tokens per step, ZeRO-3 ({cfg.train.ds_config}), {cfg.model.dtype}", flush=True)
if resolve_only:
    print(json.dumps({"params": n_params, "config": str(config), "resolved_only": True}))
    sys.exit(0)

if not (Path(cfg.data.shards_dir) / "manifest.json").exists():
    subprocess.run([sys.executable, "-P", "-m", "megamt.cli", "build-shards", str(config)], check=True)
log_path = out / "train_run.log"
shutil.rmtree(cfg.train.run_dir, ignore_errors=True)  # a fresh run: its log is read back
t_start = time.time()
proc = subprocess.Popen([sys.executable, "-P", "-m", "megamt.train", str(config), "--no-resume"], cwd=out,
                        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
records = Path(cfg.train.run_dir) / "train_log.jsonl"


def stop(signum, frame):  # the step's time limit (timeout sends SIGTERM): the trainer goes too
    os.killpg(proc.pid, signal.SIGKILL)
    sys.exit(f"train_1b: stopped by signal {signum} (the step's time limit); {len(steps())} steps logged")


signal.signal(signal.SIGTERM, stop)


def steps():
    if not records.exists():
        return []
    return [r for r in map(json.loads, records.read_text().splitlines()) if "train/loss" in r]


first = None
while proc.poll() is None:
    if first is None and steps():
        first = time.time()
        print(f"train_1b: first step after {first - t_start:.0f} s (model build, ZeRO-3 partitioning, op builds)",
              flush=True)
    if first is not None and time.time() - first >= seconds:
        break
    time.sleep(1)
rc = proc.poll()
os.killpg(proc.pid, signal.SIGKILL)  # the run is open-ended: it ends here, no checkpoint
proc.wait()
recs = steps()
if rc is not None and rc != 0 or len(recs) < 5:
    print(open(log_path).read()[-3000:])
    sys.exit(f"train_1b: the run ended (exit {rc}) after {len(recs)} steps")
measured = recs[3:]  # the first steps warm up (allocator, kernels' autotuning)
mfu = [r["perf/mfu"] for r in measured if r.get("perf/mfu") is not None]  # logged on CUDA only
res = {"params": n_params, "steps": len(recs), "startup_s": round(first - t_start, 1),
       "tokens_per_s": round(statistics.median(r["perf/tokens_per_s"] for r in measured)),
       "mfu": round(statistics.median(mfu), 3) if mfu else None,
       "peak_gib": round(max(r.get("mem/peak_gib", 0) for r in recs), 1),
       "loss_first": round(recs[0]["train/loss"], 3), "loss_last": round(recs[-1]["train/loss"], 3)}
print(json.dumps(res))
EOF
if (( DRY )); then  # resolved on any machine: the config, validated, and its size
    echo "[train_1b] resolving the training config"
    "${PYP[@]}" "$TRAIN_PY" "$OUT" "$TRAIN_S" --resolve-only 2>&1 | tee "$OUT/train_1b.log" | sed 's/^/[train_1b] /'
    (( ${PIPESTATUS[0]} == 0 )) || record train_1b "failed (config)" 0 "$OUT/train_1b.log"
fi
run_step train_1b $(( TRAIN_S + 120 )) "${PYP[@]}" "$TRAIN_PY" "$OUT" "$TRAIN_S" "${TINY[@]}"

# ---------------------------------------------------------------------------- 5./6. benchmarks
run_step bench_kernels 90 "$PY" "$REPO/tools/bench_kernels.py" --skip-cpu
run_step bench_gradients 80 "$PY" "$REPO/tools/bench_gradients.py" --skip-cpu

# ---------------------------------------------------------------------------- summary
"$PY" - "$OUT" "$(( $(date +%s) - T_ALL ))" <<'EOF'
import json, re, sys
from pathlib import Path

out, total = Path(sys.argv[1]), int(sys.argv[2])
env = json.loads((out / "env.json").read_text())


def size(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def last_json(log):
    for line in reversed(Path(log).read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


def result(step, log):
    if not Path(log).is_file():
        return log  # the reason it was skipped
    text = Path(log).read_text(errors="replace")
    if step == "install":
        return "; ".join(l for l in text.splitlines() if l.startswith("megamt from")) or text[-200:]
    if step == "tests_gpu":
        m = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error)[^=]*?)\s*=*$", text, re.M)
        return m[-1] if m else text.strip().splitlines()[-1][-200:] if text.strip() else ""
    j = last_json(log)
    if j is None:
        return (text.strip().splitlines() or [""])[-1][-200:]
    if step == "train_1b":
        if j.get("resolved_only"):
            return f"{size(j['params'])} parameters, config resolved"
        mfu = f", MFU {j['mfu']:.2f}" if j.get("mfu") is not None else ""
        return (f"{size(j['params'])} params: {j['tokens_per_s']:,} tok/s{mfu}, peak {j['peak_gib']} GiB, "
                f"{j['steps']} steps, loss {j['loss_first']} -> {j['loss_last']}, first step after {j['startup_s']} s")
    if step == "bench_kernels":
        rows = (j.get("gpu") or {}).get("rows") or []
        if not rows:
            return json.dumps(j.get("gpu"))[:200]
        n = max(r["N"] for r in rows)
        parts = [f"{r['variant']} {r['seconds'] * 1e3:.1f} ms/{r['peak_extra_GiB']:.2f} GiB" if "seconds" in r
                 else f"{r['variant']} {r.get('error')}" for r in rows if r["N"] == n]
        return f"N={n}: " + ", ".join(parts)
    if step == "bench_gradients":
        cases = [c for c in (j.get("gpu") or {}).get("cases", []) if "gram_triton_of_bw" in c]
        if not cases:
            return json.dumps(j.get("gpu"))[:200]
        return (f"copy {j['gpu']['copy_GBps']} GB/s; Triton Gram at {min(c['gram_triton_of_bw'] for c in cases):.2f}-"
                f"{max(c['gram_triton_of_bw'] for c in cases):.2f}, combine at {min(c['combine_triton_of_bw'] for c in cases):.2f}-"
                f"{max(c['combine_triton_of_bw'] for c in cases):.2f} of it; max rel. err "
                f"{max(max(c['gram_max_rel_err'], c['combine_max_rel_err']) for c in cases):.1e}")
    return ""


card = env.get("card") or "no CUDA device"
print()
print(f"megamt GPU check on {card} (python {env['python']}, torch {env.get('torch')}, CUDA {env.get('cuda')}); "
      f"{total // 60} min {total % 60} s")
print("| step | status | seconds | result |")
print("|---|---|---:|---|")
for line in (out / "summary.tsv").read_text().splitlines():
    step, status, secs, detail = line.split("\t")
    if status == "skipped":  # detail: the reason; the training config is resolved even then
        text = detail
        if step == "train_1b" and (out / "train_1b.log").is_file():
            text = f"{result(step, out / 'train_1b.log')}; run skipped: {detail}"
    else:  # detail: the step's log
        text = result(step, detail)
    print(f"| {step} | {status} | {secs} | {text} |")
EOF
# exit non-zero when a step failed or timed out (skips in a dry run are fine)
! cut -f2 "$SUMMARY" | grep -qE '^(failed|timeout)'
