#!/usr/bin/env bash
# The GPU acceptance run, in one call: restore the examples and a 1080p clip on CUDA in fp32,
# fp16 and bf16, eager and --compile, on both frame paths, each checked against the CPU's fp32
# output (benchmarks/compare_outputs.py); the bundled model alone in faces/s at batch 1, 8, 32
# and 128 per precision; the 1080p clip's frames/s end to end with 1 and 5 faces; the SD 2.1-size
# one-step configuration (random weights) per face at batch 1 and 8, eager and compiled; then a
# batch-size recommendation for `--batch-size auto` on CUDA and the project's goals.
#
#   OUT=/tmp/acc bash benchmarks/gpu_acceptance.sh --dry-run        # here, on the CPU, tiny inputs (a few minutes)
#   bash benchmarks/gpu_acceptance.sh --prepare-carry               # here: build/gpu_carry (diffusers, importlib_metadata, imageio-ffmpeg)
#   bash benchmarks/gpu_acceptance.sh --pack --budget 540           # on the lent GPU machine (see benchmarks/GPU_ACCEPTANCE.md)
#
# Every step runs under its own `timeout`, inside an overall --budget (seconds; steps that no
# longer fit are listed as skipped), in priority order, so what matters most is measured first.
# A failed step never stops the run. Output: $OUT/summary.md (step | status | seconds | key
# numbers, rewritten after every step), $OUT/run.log (every step's output, tee'd as it runs),
# $OUT/results.md (the benchmark rows, in benchmarks/RESULTS.md's columns) and the step logs:
# $OUT/logs/STEP.log, or with --pack (for the lent machine, which returns at most 8 files from
# $OUT) $OUT/logs.tar.gz, refreshed after every step.
#
# Options:
#   --dry-run          CPU, tiny inputs: the grey example and a 3-frame 1080p clip, faces at
#                      128 px (SD 2.1 size at 64 px), batches 1,2; fp16 steps are skipped (CUDA
#                      only); --compile uses torch.compile's "eager" backend (the dynamo trace,
#                      no code generation: inductor takes ~90 s per model on 2 cores)
#   --budget S         overall seconds [default: 540 on a GPU, 1800 dry]
#   --only REGEX       run only the steps whose name matches (bash regex); others are listed as skipped
#   --pack             step logs into $OUT/logs.tar.gz instead of $OUT/logs/
#   --prepare-carry    build build/gpu_carry/ from this machine's Python and exit
# Environment: OUT (default: out/gpu_acceptance), WORK (scratch, default: a new /tmp folder),
# PYTHON (default: .venv/bin/python where there is one, else python3), CARRY (default build/gpu_carry).

set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

DRY=0 PACK=0 ONLY="" BUDGET="" PREPARE=0
while (($#)); do
    case "$1" in
    --dry-run) DRY=1 ;;
    --pack) PACK=1 ;;
    --only) ONLY=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --prepare-carry) PREPARE=1 ;;
    -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON
CARRY=${CARRY:-$REPO/build/gpu_carry}

# ------------------------------------------------------------------ --prepare-carry (run here)
# What the lent machine lacks (benchmarks/GPU_ACCEPTANCE.md): diffusers and importlib_metadata,
# copied from this Python's site-packages (no __pycache__), and the imageio-ffmpeg wheel (its
# ffmpeg binary), found in WHEEL_DIRS or pip's cache.
if ((PREPARE)); then
    mkdir -p "$CARRY" || exit 1
    for pkg in diffusers importlib_metadata; do
        dir=$("$PY" -c "import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec('$pkg').origin).parent.parent)") || {
            echo "$pkg is not installed in $PY" >&2; exit 1; }
        (cd "$dir" && tar czf "$CARRY/$pkg.tar.gz" --exclude=__pycache__ "$pkg" "$pkg"-*.dist-info) || exit 1
        echo "packed $pkg from $dir: $(du -h "$CARRY/$pkg.tar.gz" | cut -f1)"
    done
    whl=$(find ${WHEEL_DIRS:-/opt/pypi/files "$HOME/.cache/pip"} -name 'imageio_ffmpeg-*manylinux*x86_64.whl' 2>/dev/null | sort -V | tail -n 1)
    if [[ -n $whl ]]; then
        cp "$whl" "$CARRY/" && echo "copied $(basename "$whl"): $(du -h "$whl" | cut -f1)"
    else
        echo "no imageio_ffmpeg wheel found: pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d $CARRY imageio-ffmpeg"
    fi
    tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
    others=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -n 1 | cut -f1)
    carry=$(du -sb "$CARRY" | cut -f1)
    echo "travels: tracked $((tree / 1048576)) MiB + untracked $((${others:-0} / 1048576)) MiB + carry $((carry / 1048576)) MiB (limit 64 MiB)"
    exit 0
fi

# ------------------------------------------------------------------ settings
OUT=${OUT:-$REPO/out/gpu_acceptance}
WORK=${WORK:-$(mktemp -d /tmp/gpu_acceptance.XXXXXX)}
mkdir -p "$OUT" "$WORK/status" || exit 2
LOGS=$OUT/logs
((PACK)) && LOGS=$WORK/logs
mkdir -p "$LOGS"
SUMMARY=$OUT/summary.md RUNLOG=$OUT/run.log RESULTS=$OUT/results.md
: >"$RUNLOG"
START=$(date +%s)
NPROC=$(nproc 2>/dev/null || echo 2)

if ((DRY)); then
    DEV=cpu MODE="dry run (CPU, tiny inputs)" BUDGET=${BUDGET:-1800}
    CLIP_FRAMES=3 VIDEO_FRAMES=3 EXAMPLES="astronaut_grey.jpg"
    MO_BATCHES=1,2 MO_COMPILE_BATCHES=1 REPEATS=1 FACE_ARGS="--face-size 128"
    SD_ARGS="--face-size 64" SD_BATCHES=1,2 SD_COMPILE_BATCHES=1
    COMPILE_BACKEND=eager SWEEP_BATCHES="2 4" SWEEP_PREC=fp32 THREADS=$NPROC
else
    DEV=cuda MODE="CUDA" BUDGET=${BUDGET:-540}
    CLIP_FRAMES=24 VIDEO_FRAMES=96 EXAMPLES="astronaut_grey.jpg astronaut_lq.jpg astronaut_pan.mp4"
    MO_BATCHES=1,8,32,128 MO_COMPILE_BATCHES=1,8,32,128 REPEATS=5 FACE_ARGS=""
    SD_ARGS="" SD_BATCHES=1,8 SD_COMPILE_BATCHES=8,1
    COMPILE_BACKEND=inductor SWEEP_BATCHES="4 16 32" SWEEP_PREC=fp16 THREADS=$NPROC
fi
INPUTS=$WORK/inputs
SITE=$WORK/site
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PY DEV DRY REPO WORK INPUTS SITE CARRY CLIP_FRAMES VIDEO_FRAMES EXAMPLES MO_BATCHES MO_COMPILE_BATCHES REPEATS
export FACE_ARGS SD_ARGS SD_BATCHES SD_COMPILE_BATCHES COMPILE_BACKEND SWEEP_BATCHES SWEEP_PREC THREADS LOGS

# Comparison limits with the CPU's fp32 output, grey levels: mean and 99th percentile per file.
declare -A MAX_MEAN=([fp32]=1.5 [fp16]=2.5 [bf16]=4) MAX_P99=([fp32]=10 [fp16]=14 [bf16]=20)
export MAX_MEAN_fp32=${MAX_MEAN[fp32]} MAX_MEAN_fp16=${MAX_MEAN[fp16]} MAX_MEAN_bf16=${MAX_MEAN[bf16]}
export MAX_P99_fp32=${MAX_P99[fp32]} MAX_P99_fp16=${MAX_P99[fp16]} MAX_P99_bf16=${MAX_P99[bf16]}

# ------------------------------------------------------------------ helpers (exported to the steps)
SKIP=77 # a step's exit code for "skipped", its reason in $KEYS

# `key TEXT`: add TEXT to this step's key numbers.
key() { printf '%s; ' "$*" >>"$KEYS"; }

# `bench_keys LOG`: the benchmark rows of LOG as "batch 8: 1234 faces/s (...)" etc.
bench_keys() {
    grep -E '^\| [0-9]{4}-' "$1" | awk -F' [|] ' '{
        what=$4; res=$5; sub(/ [|]$/, "", res)
        label=what
        if (match(what, /batch [0-9]+/)) label=substr(what, RSTART, RLENGTH)
        if (match(what, /[0-9]+ face\(s\) per frame/)) label=substr(what, RSTART, RLENGTH)
        short=res; sub(/ \(.*/, "", short); sub(/;.*/, "", short)
        extra=""; if (res ~ /FELL BACK|FALLBACK|out of GPU memory/) extra=" [" res "]"
        if (match(res, /ms\/face/)) { ms=res; sub(/^[^(]*\(/, "", ms); sub(/ ms\/face.*/, "", ms); short=short ", " ms " ms/face" }
        if (match(res, /first call [0-9.]+ s/)) short=short ", " substr(res, RSTART, RLENGTH)
        printf "%s: %s%s; ", label, short, extra }'
}

# `cli ARGS`: facerestore, through torch.compile's $CLI_BACKEND when set (dry run).
cli() {
    if [[ -n ${CLI_BACKEND:-} ]]; then
        "$PY" -c "import sys, torch
_compile = torch.compile
torch.compile = lambda model, **kw: _compile(model, **{**kw, 'backend': '$CLI_BACKEND'})
from facerestore_cli.cli import main
sys.argv[0] = 'facerestore'
main()" "$@"
    else
        "$PY" -m facerestore_cli.cli "$@"
    fi
}

# `restore_keys LOG`: faces/s and time from the CLI's summary table, and its warnings.
restore_keys() {
    local fps secs
    fps=$(grep -a 'faces per second' "$1" | tail -n 1 | awk -F'│' '{gsub(/ /, "", $3); print $3}')
    secs=$(grep -a '│ time ' "$1" | tail -n 1 | awk -F'│' '{gsub(/^ +| +$/, "", $3); print $3}')
    [[ -n $fps ]] && key "$fps faces/s, $secs"
    grep -aq 'torch.compile failed' "$1" && key "COMPILE FELL BACK TO EAGER"
    grep -aqE 'NaN/inf or black faces' "$1" && key "PRECISION FALLBACK (NaN/black faces in low precision)"
    return 0
}

wait_for_ref() {
    local waited=0
    until [[ -e $WORK/status/ref_cpu ]]; do
        ((waited % 30 == 0)) && echo "waiting for the CPU reference (ref_cpu)..."
        sleep 1
        waited=$((waited + 1))
    done
    [[ -d $WORK/out/ref_cpu ]] || { echo "no CPU reference outputs"; return 1; }
}

# ------------------------------------------------------------------ steps (each a bash -c child)
step_env() {
    echo "repo: $REPO  python: $PY  mode: dev=$DEV dry=$DRY"
    uname -a; nproc; free -g 2>/dev/null | head -n 2
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    # Carried packages (build/gpu_carry): only those this Python lacks go into $SITE.
    mkdir -p "$SITE"
    if [[ -d $CARRY ]]; then
        local f mod
        for f in "$CARRY"/*.tar.gz; do
            [[ -e $f ]] || continue
            mod=$(basename "$f" .tar.gz)
            if PYTHONPATH="$REPO" "$PY" -c "import $mod" 2>/dev/null; then
                echo "$mod: present, carried copy not used"
            else
                tar xzf "$f" -C "$SITE" && echo "$mod: from $f"
            fi
        done
        for f in "$CARRY"/*.whl; do
            [[ -e $f ]] || continue
            mod=$(basename "$f" | cut -d- -f1)
            if PYTHONPATH="$REPO" "$PY" -c "import $mod" 2>/dev/null; then
                echo "$mod: present, carried wheel not used"
            else
                "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$f" && echo "$mod: from $f" ||
                    echo "$mod: pip install of $f failed"
            fi
        done
    else
        echo "no carried packages ($CARRY)"
    fi
    "$PY" - "$KEYS" <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
import torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print("torch", torch.__version__, "cuda", torch.version.cuda, gpu)
bad = []
for mod in ("diffusers", "peft", "cv2", "click", "rich", "imageio_ffmpeg", "facerestore_cli.cli"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "ok"))
    except Exception as err:
        bad.append(mod)
        print(mod, "MISSING:", type(err).__name__, err)
try:
    import imageio_ffmpeg
    print("ffmpeg", imageio_ffmpeg.get_ffmpeg_exe())
except Exception as err:
    bad.append("ffmpeg")
    print("ffmpeg MISSING:", err)
with open(sys.argv[1] if len(sys.argv) > 1 else "/dev/null", "a") as keys:
    keys.write(f"torch {torch.__version__}, {gpu}; " + (f"MISSING: {', '.join(bad)}; " if bad else "imports ok; "))
sys.exit(1 if bad else 0)
EOF
}

step_inputs() {
    mkdir -p "$INPUTS" || return 1
    local f
    for f in $EXAMPLES; do cp "$REPO/examples/$f" "$INPUTS/" || return 1; done
    "$PY" - "$INPUTS/clip1080_1face.mp4" "$CLIP_FRAMES" <<'EOF' || return 1
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_video import make_clip
make_clip(Path(sys.argv[1]), 1, int(sys.argv[2]))
print("made", sys.argv[1])
EOF
    ls -la "$INPUTS"
    key "$(ls "$INPUTS" | wc -l) inputs: $(ls "$INPUTS" | tr '\n' ' ')"
}

step_ref_cpu() {
    # The reference: CPU fp32, numpy frame path (the path every CPU test checks).
    OMP_NUM_THREADS=$(((THREADS + 1) / 2)) cli restore "$INPUTS" -o "$WORK/out/ref_cpu" --device cpu --precision fp32 \
        --frame-path numpy --save-faces $FACE_ARGS
    local rc=$?
    restore_keys "$LOG"
    return $rc
}

step_model_only() { # PRECISION [compile]
    local p=$1 mode=${2:-eager} args=(--batches "$MO_BATCHES")
    [[ $p == fp16 && $DEV == cpu ]] && { key "fp16 needs CUDA"; return $SKIP; }
    [[ $mode == compile ]] && args=(--batches "$MO_COMPILE_BATCHES" --compile --compile-backend "$COMPILE_BACKEND")
    "$PY" benchmarks/bench_restore.py --device "$DEV" --precision "$p" --model-only --repeats "$REPEATS" \
        --threads "$THREADS" $FACE_ARGS "${args[@]}"
    local rc=$?
    key "$(bench_keys "$LOG")"
    return $rc
}

step_restore() { # PRECISION eager|compile tensor|numpy
    local p=$1 mode=$2 fp=$3 name=restore_$1_$2_$3 rc args=()
    [[ $p == fp16 && $DEV == cpu ]] && { key "fp16 needs CUDA"; return $SKIP; }
    [[ $mode == compile ]] && args=(--compile)
    if [[ $mode == compile && $DRY == 1 ]]; then
        export CLI_BACKEND=$COMPILE_BACKEND
        key "torch.compile backend $COMPILE_BACKEND (dry run)"
    fi
    cli restore "$INPUTS" -o "$WORK/out/$name" --device "$DEV" --precision "$p" --frame-path "$fp" --save-faces \
        $FACE_ARGS "${args[@]}"
    rc=$?
    restore_keys "$LOG"
    ((rc)) && return $rc
    wait_for_ref || return 1
    local mm=MAX_MEAN_$p mp=MAX_P99_$p
    "$PY" benchmarks/compare_outputs.py "$WORK/out/ref_cpu" "$WORK/out/$name" --label "$name vs cpu fp32" \
        --max-mean "${!mm}" --max-p99 "${!mp}"
    rc=$?
    key "$(grep -a '^compare ' "$LOG" | tail -n 1 | sed 's/^compare [^:]*: //')"
    return $rc
}

step_video() { # PRECISION [frame path] [batch sizes (a sweep on 5 faces)]
    local p=$1 fp=${2:-auto} sweep=${3:-} rc=0 b
    [[ $p == fp16 && $DEV == cpu ]] && { key "fp16 needs CUDA"; return $SKIP; }
    if [[ -z $sweep ]]; then
        "$PY" benchmarks/bench_video.py --device "$DEV" --precision "$p" --frames "$VIDEO_FRAMES" --faces 1,5 \
            --frame-path "$fp" --threads "$THREADS" $FACE_ARGS || rc=$?
    else
        for b in $sweep; do
            echo "--- batch $b"
            "$PY" benchmarks/bench_video.py --device "$DEV" --precision "$p" --frames "$VIDEO_FRAMES" --faces 5 \
                --frame-path "$fp" --threads "$THREADS" --batch-size "$b" --video-chunk "$b" $FACE_ARGS || rc=$?
        done
    fi
    if [[ -n $sweep ]]; then
        key "$(grep -E '^\| [0-9]{4}-' "$LOG" | sed -E 's/.*batch ([0-9]+), chunk.*\| ([0-9.]+ frames\/s).*/batch \1: \2/' | tr '\n' ';' | sed 's/;/; /g')"
    else
        key "$(bench_keys "$LOG")"
    fi
    return $rc
}

step_sd21() { # PRECISION eager|compile
    local p=$1 mode=$2 args=(--batches "$SD_BATCHES")
    [[ $p == fp16 && $DEV == cpu ]] && { key "fp16 needs CUDA"; return $SKIP; }
    [[ $mode == compile ]] && args=(--batches "$SD_COMPILE_BATCHES" --compile --compile-backend "$COMPILE_BACKEND")
    "$PY" benchmarks/bench_restore.py --config sd21 --device "$DEV" --precision "$p" --model-only --repeats "$REPEATS" \
        --threads "$THREADS" $SD_ARGS "${args[@]}"
    local rc=$?
    key "$(bench_keys "$LOG")"
    return $rc
}

step_goals() {
    # --batch-size auto on CUDA from the model-only rows, and the goals of benchmarks/GPU_ACCEPTANCE.md.
    "$PY" - "$LOGS" "$DEV" "$KEYS" <<'EOF'
import re, sys
from pathlib import Path
logs, dev, keys = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = lambda name: [l for l in (logs / f"{name}.log").read_text(errors="replace").splitlines() if re.match(r"\| \d{4}-", l)] if (logs / f"{name}.log").exists() else []
def per_batch(name):
    out = {}
    for l in rows(name):
        b, r = re.search(r"batch (\d+)", l), re.search(r"([\d.]+) faces/s", l)
        if b and r and "FELL BACK" not in l:
            out[int(b.group(1))] = float(r.group(1))
    return out
notes, best_model = [], 0.0
for name in sorted(p.stem for p in logs.glob("model_only_*.log")):
    fps = per_batch(name)
    if not fps:
        continue
    top = max(fps.values())
    best_model = max(best_model, top)
    pick = min(b for b, v in fps.items() if v >= 0.9 * top)  # smallest batch within 10 % of the best
    line = f"{name}: " + ", ".join(f"b{b} {v:.0f}" for b, v in sorted(fps.items())) + f" faces/s; smallest batch within 10 % of the best: {pick}"
    print(line)
    notes.append(f"{name.removeprefix('model_only_')} auto batch {pick}")
fps1 = []
for name in sorted(p.stem for p in logs.glob("video_*.log")):
    for l in rows(name):
        m = re.search(r"1 face\(s\) per frame.*?\| ([\d.]+) frames/s", l)
        if m:
            fps1.append((float(m.group(1)), name))
sd8 = []
for name in sorted(p.stem for p in logs.glob("sd21_*.log")):
    for l in rows(name):
        m = re.search(r"batch 8 \| .*?\(([\d.]+) ms/face", l)
        if m and "FELL BACK" not in l:
            sd8.append((float(m.group(1)), name))
def goal(text, value, ok):
    verdict = "n/a (not measured)" if value is None else ("n/a (CPU dry run)" if dev == "cpu" else ("MET" if ok else "NOT MET"))
    print(f"goal: {text}: {verdict}" + ("" if value is None else f" (best {value})"))
    return f"{text.split(' ')[0]} {verdict}"
g = [goal("bundled model >= 1000 faces/s model-only", f"{best_model:.0f} faces/s" if best_model else None, best_model >= 1000),
     goal("1080p one face >= 60 fps end to end", f"{max(fps1)[0]:.1f} fps ({max(fps1)[1]})" if fps1 else None, bool(fps1) and max(fps1)[0] >= 60),
     goal("SD 2.1-size one-step <= 8 ms/face at batch 8", f"{min(sd8)[0]:.1f} ms/face ({min(sd8)[1]})" if sd8 else None, bool(sd8) and min(sd8)[0] <= 8)]
with open(keys, "a") as f:
    f.write("; ".join(notes + g) + "; ")
EOF
}

export -f key bench_keys cli restore_keys wait_for_ref step_env step_inputs step_ref_cpu step_model_only step_restore
export -f step_video step_sd21 step_goals
export SKIP

# ------------------------------------------------------------------ the runner
STEPS=() # "name|max seconds|background|function args..."
add() { STEPS+=("$1|$2|$3|$4"); }

add env 120 fg "step_env"
add inputs 90 fg "step_inputs"
add ref_cpu 300 $( ((DRY)) && echo fg || echo bg) "step_ref_cpu"
for p in fp16 bf16 fp32; do add "model_only_$p" 120 fg "step_model_only $p"; done
for p in fp16 bf16 fp32; do for fp in tensor numpy; do add "restore_${p}_eager_$fp" 180 fg "step_restore $p eager $fp"; done; done
add video_fp16 180 fg "step_video fp16"
add video_bf16 180 fg "step_video bf16"
add sd21_fp16_eager 150 fg "step_sd21 fp16 eager"
add restore_fp16_compile_tensor 300 fg "step_restore fp16 compile tensor"
add model_only_fp16_compile 300 fg "step_model_only fp16 compile"
add sd21_fp16_compile 420 fg "step_sd21 fp16 compile"
add video_fp32 180 fg "step_video fp32"
add restore_fp16_compile_numpy 300 fg "step_restore fp16 compile numpy"
for p in bf16 fp32; do for fp in tensor numpy; do add "restore_${p}_compile_$fp" 300 fg "step_restore $p compile $fp"; done; done
add sd21_bf16_eager 150 fg "step_sd21 bf16 eager"
add model_only_bf16_compile 300 fg "step_model_only bf16 compile"
add video_fp16_numpy 180 fg "step_video fp16 numpy"
add video_batch_sweep 240 fg "step_video $SWEEP_PREC auto '$SWEEP_BATCHES'"
add sd21_bf16_compile 420 fg "step_sd21 bf16 compile"
add goals 60 fg "step_goals"

now() { date +%s; }

write_summary() {
    local tmp=$SUMMARY.tmp entry name st secs keys
    {
        echo "# GPU acceptance run: $MODE"
        echo
        echo "$(date -u '+%Y-%m-%d %H:%M UTC'), ${HOSTNAME:-?}, $(nproc) CPUs; budget ${BUDGET}s, $(($(now) - START))s so far; repo $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo ' (with uncommitted changes)')"
        echo
        echo "| step | status | seconds | key numbers |"
        echo "| --- | --- | --- | --- |"
        for entry in "${STEPS[@]}"; do
            name=${entry%%|*}
            if [[ -e $WORK/status/$name ]]; then
                IFS=$'\t' read -r st secs <"$WORK/status/$name"
                keys=$(cat "$WORK/status/$name.keys" 2>/dev/null | sed 's/[; ]*$//; s/|/\//g')
            elif [[ -e $WORK/status/$name.running ]]; then
                st="running" secs=$(($(now) - $(cat "$WORK/status/$name.running"))) keys=""
            else
                st="pending" secs="" keys=""
            fi
            echo "| $name | $st | $secs | $keys |"
        done
    } >"$tmp" && mv "$tmp" "$SUMMARY"
    grep -haE '^\| [0-9]{4}-' "$LOGS"/*.log 2>/dev/null | sort -u >"$RESULTS.tmp" && mv "$RESULTS.tmp" "$RESULTS"
    if ((PACK)); then tar czf "$OUT/logs.tar.gz.tmp" -C "$WORK" logs 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"; fi
}

finish_step() { # name rc seconds
    local name=$1 rc=$2 secs=$3 limit=$4 st
    case $rc in
    0) st=ok ;;
    "$SKIP") st=skipped ;;
    124 | 137) st="TIMEOUT (${limit}s)" ;;
    *) st="FAIL (exit $rc)" ;;
    esac
    printf '%s\t%s\n' "$st" "$secs" >"$WORK/status/$name"
    rm -f "$WORK/status/$name.running"
    echo "=== $name: $st in ${secs}s: $(cat "$WORK/status/$name.keys" 2>/dev/null)" | tee -a "$RUNLOG"
}

run_step() { # name max background function...
    local name=$1 max=$2 bg=$3 fn=$4 left limit t0 rc
    export KEYS=$WORK/status/$name.keys LOG=$LOGS/$name.log
    : >"$KEYS"
    if [[ -n $ONLY && ! $name =~ $ONLY && $name != env ]]; then
        echo "not in --only $ONLY" >"$KEYS"
        printf 'skipped\t0\n' >"$WORK/status/$name"
        return
    fi
    left=$((BUDGET - ($(now) - START)))
    if ((left < 30)); then
        echo "budget: ${left}s left of ${BUDGET}s" >"$KEYS"
        printf 'skipped\t0\n' >"$WORK/status/$name"
        echo "=== $name: skipped (budget)" | tee -a "$RUNLOG"
        return
    fi
    limit=$((max < left ? max : left))
    echo "=== $name (timeout ${limit}s): $fn" | tee -a "$RUNLOG"
    now >"$WORK/status/$name.running"
    write_summary
    t0=$(now)
    if [[ $bg == bg ]]; then
        (
            timeout -k 10 "$limit" bash -c "$fn" 2>&1 | tee "$LOG" | sed -u "s/^/[$name] /" >>"$RUNLOG"
            finish_step "$name" "${PIPESTATUS[0]}" $(($(now) - t0)) "$limit"
        ) &
        return
    fi
    timeout -k 10 "$limit" bash -c "$fn" 2>&1 | tee "$LOG" | sed -u "s/^/[$name] /" >>"$RUNLOG"
    rc=${PIPESTATUS[0]}
    finish_step "$name" "$rc" $(($(now) - t0)) "$limit"
    write_summary
}

echo "GPU acceptance run ($MODE): OUT=$OUT WORK=$WORK budget ${BUDGET}s" | tee -a "$RUNLOG"
write_summary
for entry in "${STEPS[@]}"; do
    IFS='|' read -r name max bg fn <<<"$entry"
    if [[ $name == goals ]]; then
        wait # the background reference, before the last word
    fi
    run_step "$name" "$max" "$bg" "$fn"
done
wait
write_summary
echo
cat "$SUMMARY"
# Exit 0 when every step that ran passed (skipped steps are not failures).
! grep -qE '^\| [^|]+ \| (FAIL|TIMEOUT)' "$SUMMARY"
