#!/usr/bin/env bash
# The GPU check: reduced GPU versions of the four families through
# `ablate-worker sweep`, several trials sharing the GPU, within 9 minutes on an
# H100. Run from the repository root of the tree `cargo xtask gpu` laid out
# (it puts the release worker and the data sets in gpu/bundle.tar.gz):
#
#   bash xtask/scripts/gpu-check.sh [--dry-run] [--require verdict|succeeded] [--set PATH=VALUE]... [FAMILY...]
#
# FAMILY is any of mup-fashion mup-transformer cbs intrinsic dsir fused (all
# by default; name some to rerun them). Each family's table and verdict is
# printed, with its wall time, trials per minute, steps per second and the
# most GPU memory in use; trial logs, reports and a summary go to $OUT (or
# ./gpu-out). A family cut short by its time limit is reported from what it
# finished. --dry-run runs the same on the CPU with every spec cut to a few
# steps (`cargo xtask gpu --dry-run`, in CI), with the worker and data named by
# ABLATE_GPU_BIN and ABLATE_DATA. --set overrides a field of every family's
# spec (after the dry run's cuts).
#
# The exit status is 0 only when every family passed: every trial succeeded
# and every criterion of its verdict holds (--require verdict, the default),
# or, in a dry run whose few steps cannot meet the criteria, every trial
# succeeded and every report has a verdict (--require succeeded, the dry run's
# default). What fell short is printed as `FAILED: ...` lines naming the
# criterion, its measurement, what it needs and by how much it misses.
set -uo pipefail

dry=0
require=
families=()
extra_sets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --require)
            require=${2:-}
            shift
            ;;
        --set)
            extra_sets+=(--set "${2:-}")
            shift
            ;;
        mup-fashion | mup-transformer | cbs | intrinsic | dsir | fused) families+=("$1") ;;
        *)
            echo "gpu-check: unknown argument $1; expected --dry-run, --require verdict|succeeded, --set PATH=VALUE or a family: mup-fashion mup-transformer cbs intrinsic dsir fused" >&2
            exit 2
            ;;
    esac
    shift
done
if [ -z "$require" ]; then
    if [ $dry = 1 ]; then require=succeeded; else require=verdict; fi
fi
case "$require" in
    verdict | succeeded) ;;
    *)
        echo "gpu-check: --require takes verdict or succeeded, not '$require'" >&2
        exit 2
        ;;
esac
if [ ${#families[@]} -eq 0 ]; then
    families=(mup-fashion mup-transformer cbs intrinsic dsir fused)
fi

root=$(pwd)
out=${OUT:-$root/gpu-out}
mkdir -p "$out"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT

if [ -n "${ABLATE_GPU_BIN:-}" ]; then
    bin=$ABLATE_GPU_BIN
    export ABLATE_DATA=${ABLATE_DATA:?set ABLATE_DATA to the data sets folder}
elif [ -f gpu/bundle.tar.gz ]; then
    tar -xzf gpu/bundle.tar.gz -C "$work"
    bin=$work/bin/ablate-worker
    export ABLATE_DATA=$work/data
else
    echo "gpu-check: no gpu/bundle.tar.gz here: run cargo xtask gpu first (or set ABLATE_GPU_BIN and ABLATE_DATA)" >&2
    exit 2
fi

# libtorch comes from the machine's own torch where there is one.
python=python3
for candidate in /opt/torch/.venv/bin/python "${TORCH_PYTHON:-}"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then python=$candidate; fi
done
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null || true)
if [ -n "$torch_lib" ] && [ -d "$torch_lib" ]; then
    export LD_LIBRARY_PATH=$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

echo "== machine"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuda available:", torch.cuda.is_available())' 2>/dev/null ||
    echo "torch: not importable from $python (the worker's own libtorch is used)"
"$bin" devices 2>&1 | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/worker: /'

if [ $dry = 1 ]; then
    devices=cpu:2
else
    devices=cuda:0*4
fi
fashion=/usr/share/datasets/fashion-mnist
[ -d "$ABLATE_DATA/fashion-mnist" ] && fashion=$ABLATE_DATA/fashion-mnist

# family -> spec|time limit (s)|family for the report|the dry run's cuts
family_row() {
    case "$1" in
        mup-fashion) echo "mup-width-fashion-mnist.toml|60|mup_transfer|base.steps=3 base.base_width=32 sweep.params.width=[32,64] sweep.params.log2_lr=[-8,-6]" ;;
        mup-transformer) echo "mup-width-transformer.toml|150|mup_transfer|base.steps=3 base.warmup_steps=0 base.context=32 base.base_width=32 sweep.params.width=[32,64] sweep.params.log2_lr=[-8,-6]" ;;
        cbs) echo "cbs-char-gpt.toml|150|critical_batch|base.width=32 base.context=32 base.examples=256 base.cbs={reference_batch=8,budgets=[64,128]} base.noise_scale={small=4,big=16,repeats=1} sweep.params.batch_size=[8,16] sweep.params.log2_lr=[-9]" ;;
        intrinsic) echo "intrinsic-mnist.toml|80|intrinsic_dim|base.steps=3 sweep.params.subspace_dim=[0,50]" ;;
        dsir) echo "dsir-downstream-gpu.toml|90|dsir|base.train.steps=3 base.train.warmup_steps=0 base.train.width=32 base.train.depth=1 base.train.context=32 base.train.batch_size=8 base.train.eval_every=3" ;;
    esac
}

# Steps a trial of the log trained: max(steps, ceil(examples / batch)), or its train
# table's (DSIR's feature and select stages train nothing).
summary_py='
import json, math, sys
log, wall, name = sys.argv[1], float(sys.argv[2]), sys.argv[3]
trials = [json.loads(l) for l in open(log) if l.strip()] if log else []
def steps(p):
    if p.get("stage") in ("features", "select"):
        return 0
    t = p.get("train") if isinstance(p.get("train"), dict) else p
    s = t.get("steps", 0) or 0
    if t.get("examples") and t.get("batch_size"):
        s = max(s, math.ceil(t["examples"] / t["batch_size"]))
    return s
ok = [t for t in trials if t.get("state") == "succeeded"]
total = sum(steps(t.get("params", {})) for t in ok)
print(json.dumps({"family": name, "trials": len(trials), "succeeded": len(ok), "wall_s": round(wall, 1),
                  "trials_per_min": round(60 * len(ok) / wall, 2) if wall else 0,
                  "steps_per_s": round(total / wall, 1) if wall else 0}))
'

status=0
if [ ${#families[@]} -eq 6 ]; then rm -f "$out/summary.jsonl"; fi
touch "$out/summary.jsonl"
for family in "${families[@]}"; do
    if [ "$family" = fused ]; then
        # Trials/hour of the muP width sweep's MLPs, fused in groups of 8 and one by one.
        echo
        echo "== fused (ablate-worker bench-fused, groups of 8)"
        if [ $dry = 1 ]; then
            fused_args=(--device cpu --steps 3 --widths 32,64)
        else
            fused_args=(--device cuda:0)
        fi
        if timeout --signal=TERM --kill-after=10 120 "$bin" bench-fused "${fused_args[@]}" \
            >"$out/fused.jsonl" 2>"$out/fused.log"; then
            cat "$out/fused.jsonl"
            "$python" -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    f, u = r["fused_trials_per_hour"], r["unfused_trials_per_hour"]
    print("width %4d: fused %10.0f trials/h, one by one %10.0f, x%.1f" % (r["width"], f, u, f / u))' "$out/fused.jsonl"
        else
            echo "fused bench failed:"
            tail -20 "$out/fused.log"
            status=1
        fi
        continue
    fi
    IFS='|' read -r spec limit report_family cuts <<<"$(family_row "$family")"
    sets=()
    if [ "$family" = mup-fashion ]; then sets+=(--set "base.data_dir=$fashion"); fi
    if [ $dry = 1 ]; then
        for cut in $cuts; do sets+=(--set "$cut"); done
        limit=300
    fi
    log=$out/$family.trials.jsonl
    rm -f "$log"
    echo
    echo "== $family ($spec, $devices, limit ${limit}s)"
    mem=$out/$family.gpu-memory
    : >"$mem"
    if command -v nvidia-smi >/dev/null && [ $dry = 0 ]; then
        (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >>"$mem" 2>/dev/null; sleep 1; done) &
        sampler=$!
    else
        sampler=
    fi
    start=$(date +%s%N)
    sets+=("${extra_sets[@]}")
    timeout --signal=TERM --kill-after=10 "$limit" "$bin" sweep "experiments/specs/gpu/$spec" --devices "$devices" \
        "${sets[@]}" --require "$require" --trial-log "$log" --out "$out/$family.json" \
        >"$out/$family.report.txt" 2>"$out/$family.log"
    code=$?
    end=$(date +%s%N)
    [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
    wall=$(((end - start) / 1000000))e-3
    if [ $code -eq 0 ]; then
        cat "$out/$family.report.txt"
    elif [ $code -eq 3 ]; then
        # It ran, but fell short of --require: the report (if any) ends with FAILED lines.
        cat "$out/$family.report.txt"
        grep -h '^error:' "$out/$family.log" | sed 's/^error:/FAILED:/'
        echo "$family: FAILED (--require $require)"
        status=1
    elif [ -s "$log" ]; then
        echo "($family stopped with code $code after ${wall}s; the report of what finished:)"
        "$bin" report --family "$report_family" "$log" | tee "$out/$family.report.txt" || status=1
        status=1
    else
        echo "$family failed with code $code before any trial finished:"
        tail -20 "$out/$family.log"
        status=1
    fi
    "$python" -c "$summary_py" "$log" "$wall" "$family" | tee -a "$out/summary.jsonl"
    if [ -s "$mem" ]; then
        echo "most GPU memory in use: $(sort -n "$mem" | tail -1) MiB"
    fi
done
echo
echo "== summary (also in $out/summary.jsonl)"
cat "$out/summary.jsonl"
if [ $status -ne 0 ]; then
    echo "gpu-check: FAILED (a family fell short of --require $require; see its FAILED lines above)"
fi
exit $status
