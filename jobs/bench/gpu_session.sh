#!/usr/bin/env bash
# Issue 27's GPU run, prepared: the wheels the device image lacks, carried in parts; the GPU tests;
# the bench's GPU items (ours vs plain transformers + bitsandbytes, eager and compiled, with the
# profiler's top ops, and the real scoring path); jobs.train with one GPU worker and jobs.label with
# one GPU scoring actor against local files and a local Iceberg catalog. Every step prints what it
# ran and tees its output into $OUT.
#
# Run as (here, on the CPU machine, before asking for a device):
#     bash jobs/bench/gpu_session.sh stage      # wheels into .whl/gpu-1 .. gpu-N, each <= PART_MB (56 MiB)
#     bash jobs/bench/gpu_session.sh dry-run    # every device step on CPU at tiny size (~4 min on 2 cores)
# then on the device, one call per part, back to back (the machine goes back after 30 s idle; the
# parts accumulate in /tmp/gpu-session while it stays warm), carry [".whl/gpu-K"] in call K:
#     bash jobs/bench/gpu_session.sh receive gpu-1 install tests bench   # ~8 min
#     bash jobs/bench/gpu_session.sh receive gpu-2                         # seconds: a part of ray's wheel
#     ...
#     bash jobs/bench/gpu_session.sh receive gpu-N install ray            # ~3 min
# `stage` prints the exact calls for the parts it made. Steps run in the order given.
#
# Why parts: one call carries at most 64 MiB (the working tree included), and the wheels are about
# 250 MB, estimated (ray's alone is 79 MB, so it is cut with `split -b` and joined again, checked by sha256).
# Versions are the ones this project is tested with; transformers is 5.24.0, the release that ran
# on the device image's huggingface_hub (2026-11-29); the image's torch, accelerate, pandas,
# pyarrow, scipy, scikit-learn, aiohttp, grpcio, protobuf... are used as they are there.
set -uo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-python3}
OUT=${OUT:-runs/gpu-session}
WHEELS=.whl
RECEIVED=${RECEIVED:-/tmp/gpu-session}
PART_MB=${PART_MB:-56}
# The bench's sizes: what fits one call of ~8 minutes on an H200 beside the tests (Mistral-7B
# saved once, loaded three times, four compiles).
BENCH_ARGS=${BENCH_ARGS:---gpu-batch-sizes 1024 --gpu-iters 5 --realpath-rows 50000}

# Needed by the GPU tests and the bench (bitsandbytes is absent there, its transformers too old).
GPU_WHEELS="bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2"
# Needed by jobs.train / jobs.label: ray[data,train,default], pyiceberg[pyarrow,sql-sqlite], polars
# and what they need that the image lacks (the closure of this venv's requirements, less the image's
# package list in the device tool's KINDS.md).
RAY_WHEELS="ray==2.60.0 polars==2.1.0 polars-runtime-32==2.1.0 pyiceberg==0.12.0 sqlalchemy==2.1.9 \
jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 tensorboardx==2.6.5 \
aiohttp-cors==0.8.1 colorful==0.5.8 py-spy==0.4.3 opencensus==0.11.4 opencensus-context==0.1.3 \
google-api-core==2.44.0 google-auth==2.63.0 googleapis-common-protos==1.76.0 proto-plus==1.29.0 \
pyasn1==0.6.5 pyasn1-modules==0.4.2 cachetools==8.0.2 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 \
opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-exporter-prometheus==0.66b2 \
opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2 smart-open==9.0.4 \
virtualenv==21.15.14 distlib==0.4.4 platformdirs==4.14.9 python-discovery==1.9.9 \
mmh3==5.3.1 pyroaring==1.2.0 strictyaml==1.7.3 tenacity==9.2.1 zstandard==0.25.0"

say() { printf '\n=== %s\n' "$*"; }
mkdir -p "$OUT"
[ -f "$RECEIVED/env" ] && source "$RECEIVED/env"

# ---- here: download, then pack into parts --------------------------------------------------------

download() {  # the wheels for the device's Python 3.12 on x86-64 Linux, no dependencies resolved
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$1" $2
}

pack() {  # pack SRC_DIR...: every file of the folders, in order, into $WHEELS/gpu-K of at most PART_MB
    local limit=$((PART_MB * 1024 * 1024)) part=1 used=0 file size name
    rm -rf "$WHEELS"/gpu-* "$WHEELS/MANIFEST" "$WHEELS/pieces"
    mkdir -p "$WHEELS/gpu-1" "$WHEELS/pieces"
    place() {  # place FILE: into the current part, or the next one when it would overflow
        size=$(stat -c %s "$1")
        if [ $((used + size)) -gt "$limit" ] && [ "$used" -gt 0 ]; then
            part=$((part + 1)); used=0; mkdir -p "$WHEELS/gpu-$part"
        fi
        cp "$1" "$WHEELS/gpu-$part/"; used=$((used + size))
    }
    for dir in "$@"; do
        for file in "$dir"/*; do
            name=$(basename "$file")
            size=$(stat -c %s "$file")
            if [ "$size" -gt "$limit" ]; then  # larger than a part: cut it, one piece per part
                split -b "$((limit - limit / 16))" -d -a 2 "$file" "$WHEELS/pieces/$name.piece-"
                echo "$name $(sha256sum "$file" | cut -d' ' -f1) $(ls "$WHEELS/pieces/$name".piece-* | wc -l)" >> "$WHEELS/MANIFEST"
                for piece in "$WHEELS/pieces/$name".piece-*; do place "$piece"; done
            else
                echo "$name $(sha256sum "$file" | cut -d' ' -f1) 1" >> "$WHEELS/MANIFEST"
                place "$file"
            fi
        done
    done
    for dir in "$WHEELS"/gpu-*; do cp "$WHEELS/MANIFEST" "$dir/"; done
    rm -rf "$WHEELS/pieces"
    say "packed into $part part(s) of at most $PART_MB MiB"
    du -sh "$WHEELS"/gpu-*
}

stage() {
    say "downloading $(wc -w <<< "$GPU_WHEELS $RAY_WHEELS") wheels for Python 3.12, manylinux x86-64"
    rm -rf "$WHEELS/gpu" "$WHEELS/ray"
    download "$WHEELS/gpu" "$GPU_WHEELS"
    download "$WHEELS/ray" "$RAY_WHEELS"
    pack "$WHEELS/gpu" "$WHEELS/ray"
    local n; n=$(ls -d "$WHEELS"/gpu-* | wc -l)
    say "device calls, back to back (carry [\".whl/gpu-K\"] in call K):"
    echo "  1: bash jobs/bench/gpu_session.sh receive gpu-1 install tests bench"
    for k in $(seq 2 $((n - 1))); do echo "  $k: bash jobs/bench/gpu_session.sh receive gpu-$k"; done
    [ "$n" -gt 1 ] && echo "  $n: bash jobs/bench/gpu_session.sh receive gpu-$n install ray"
    echo "(call 1 needs the GPU wheels complete in gpu-1: $(ls "$WHEELS/gpu-1" | grep -c -E '^(bitsandbytes|transformers|peft)-') of 3 there)"
}

# ---- on the device: receive parts, join, install --------------------------------------------------

receive() {  # receive PART: keep this call's part until the last one has come
    mkdir -p "$RECEIVED/parts"
    cp "$WHEELS/$1"/* "$RECEIVED/parts/" || return 1
    say "received $1: $(ls "$RECEIVED/parts" | wc -l) files held in $RECEIVED/parts"
}

joined() {  # join every wheel whose pieces have all come and check its sha256; print their paths
    local name sha pieces wheel
    mkdir -p "$RECEIVED/wheels"
    while read -r name sha pieces; do
        wheel="$RECEIVED/wheels/$name"
        if [ "$pieces" = 1 ]; then
            [ -f "$RECEIVED/parts/$name" ] || { echo "waiting for $name" >&2; continue; }
            cp "$RECEIVED/parts/$name" "$wheel"
        else
            [ "$(ls "$RECEIVED/parts/$name".piece-* 2>/dev/null | wc -l)" = "$pieces" ] \
                || { echo "waiting for a piece of $name" >&2; continue; }
            cat "$RECEIVED/parts/$name".piece-* > "$wheel"
        fi
        [ "$(sha256sum "$wheel" | cut -d' ' -f1)" = "$sha" ] || { echo "error: $name does not match its sha256" >&2; return 1; }
        echo "$wheel"
    done < "$RECEIVED/parts/MANIFEST"
}

install() {  # install the complete wheels not installed yet into /tmp/site (the image's site stays as it is)
    local todo=() wheel
    mkdir -p "$RECEIVED/installed"
    while read -r wheel; do
        [ -f "$RECEIVED/installed/$(basename "$wheel")" ] || todo+=("$wheel")
    done < <(joined)
    if [ ${#todo[@]} -gt 0 ]; then
        say "installing ${#todo[@]} wheel(s) into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "${todo[@]}" || return 1
        for wheel in "${todo[@]}"; do touch "$RECEIVED/installed/$(basename "$wheel")"; done
    fi
    echo "export PYTHONPATH=/tmp/site:$PWD" > "$RECEIVED/env"
    source "$RECEIVED/env"
}

# ---- the device steps -------------------------------------------------------------------------------

run() {  # run LOG CMD...: print the command, run it, tee its output into $OUT/LOG, note a failure
    local log=$1; shift
    say "$*"
    local started=$SECONDS
    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 "$@" 2>&1 | tee -a "$OUT/$log"
    local status=${PIPESTATUS[0]}
    echo "--- exit $status after $((SECONDS - started)) s" | tee -a "$OUT/$log"
    [ "$status" = 0 ] || FAILED+=("$log: $*")
}

tests() {
    [ "$(device)" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| bitsandbytes', b.__version__)"
    run tests.log "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
}

bench() {
    local args=(--device cuda --items gpu,realpath $BENCH_ARGS)
    [ "$(device)" = cpu ] && args=(--device cpu --gpu-size tiny --items gpu,realpath --compile on --smoke)
    run bench.log "$PY" -m jobs.bench "${args[@]}" --workdir "$RECEIVED/bench" --out "$OUT/gpu.json"
}

ray_jobs() {
    local work="$RECEIVED/ray" train_gpu=() label_gpu=(--gpus-per-actor 0)
    [ "$(device)" = cuda ] && train_gpu=(--use-gpu) && label_gpu=(--gpus-per-actor 1)
    rm -rf "$work"; mkdir -p "$work/warehouse"
    run ray.log "$PY" -c "
from datetime import date
from jobs.support.sample_ledgers import write_nights
from jobs.support.tiny import build_tiny_mistral
print('backbone', build_tiny_mistral('$work/backbone'))
print(len(write_nights('$work/ledger', date(2024, 1, 1), 3)), 'nights of ledger under $work/ledger')"
    export PYICEBERG_CATALOG__GPU__TYPE=sql PYICEBERG_CATALOG__GPU__URI="sqlite:///$work/catalog.db" \
        PYICEBERG_CATALOG__GPU__WAREHOUSE="file://$work/warehouse"
    run ray.log "$PY" -m jobs.train --config configs/tiny.yaml --base-model "$work/backbone" \
        --data clf_core/sample_data/coa_income_expense.csv --text-column full_path --limit-rows 400 --epochs 1 \
        --num-workers 1 --cpus-per-worker 2 "${train_gpu[@]}" --output "$work/model"
    run ray.log "$PY" -m jobs.label --model "$work/model" --input "$work/ledger" --catalog gpu \
        --output-table gpu.labeled --cache "$work/cache" --actors 1 --cpus-per-actor 2 "${label_gpu[@]}" --batch-size 64
    run ray.log "$PY" -c "
from pyiceberg.catalog import load_catalog
rows = load_catalog('gpu').load_table('gpu.labeled').scan().to_pandas()
print(len(rows), 'rows in gpu.labeled; labels', rows['label'].value_counts(dropna=False).to_dict(),
      '; model versions', rows['model_version'].unique().tolist(), '; needs_review', int(rows['needs_review'].sum()))"
}

# ---- here: the same steps on CPU, and the parts' round trip -----------------------------------------

parts_selftest() {  # pack three fake wheels (one larger than a part) in two folders, receive every part, join
    local dir got
    dir=$(mktemp -d)
    say "parts round trip: fake wheels in $dir, PART_MB=1"
    mkdir -p "$dir/a" "$dir/b"
    head -c 300000 /dev/urandom > "$dir/a/small-1.0-py3-none-any.whl"
    head -c 2500000 /dev/urandom > "$dir/b/large-1.0-py3-none-any.whl"
    head -c 600000 /dev/urandom > "$dir/b/other-1.0-py3-none-any.whl"
    got=$(PART_MB=1 WHEELS="$dir/.whl" RECEIVED="$dir/received"
          pack "$dir/a" "$dir/b" >&2
          for part in "$WHEELS"/gpu-*; do receive "$(basename "$part")" >&2; done
          joined | xargs -n1 basename | sort | tr '\n' ' ')
    rm -rf "$dir"
    if [ "$got" = "large-1.0-py3-none-any.whl other-1.0-py3-none-any.whl small-1.0-py3-none-any.whl " ]; then
        echo "ok: every wheel joined and matched its sha256"
    else
        echo "error: joined [$got]"; FAILED+=("parts round trip")
    fi
}

dry_run() {
    export DEVICE=cpu PY="${PY_DRY:-.venv/bin/python}" OUT=runs/gpu-session-dry RECEIVED=/tmp/gpu-session-dry
    rm -rf "$OUT" "$RECEIVED"; mkdir -p "$OUT"
    parts_selftest
    tests
    bench
    ray_jobs
}

device() {  # what the steps run on: cuda there, cpu in the dry run
    echo "${DEVICE:-cuda}"
}

FAILED=()
while [ $# -gt 0 ]; do
    case "$1" in
        stage) stage ;;
        receive) receive "$2" || FAILED+=("receive $2"); shift ;;
        install) install || FAILED+=("install") ;;
        tests) tests ;;
        bench) bench ;;
        ray) ray_jobs ;;
        dry-run) dry_run ;;
        parts-selftest) parts_selftest ;;
        *) echo "error: unknown step $1; steps: stage, receive gpu-K, install, tests, bench, ray, dry-run, parts-selftest"
           exit 2 ;;
    esac
    shift
done
if [ ${#FAILED[@]} -gt 0 ]; then
    say "FAILED: ${FAILED[*]}"
    exit 1
fi
say "all steps passed; output in $OUT"
