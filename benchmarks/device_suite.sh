#!/usr/bin/env bash
# One run of the accelerator figures, on a GPU (or TPU) machine, in under 8 minutes there:
#   1. train-step MFU of the imagenet256 transformer in fp32 and bf16 (benchmarks/train_speed.py),
#   2. decoding images/s at T = 8, 12, 16 (benchmarks/sample_speed.py),
#   3. MaskGIT against KV-cached autoregressive decoding of the same grid
#      (benchmarks/decode_speed.py),
#   4. the attention core per implementation: einsum blocks, XLA's and (GPU) cuDNN's fused
#      attention, and the forward pass with the backend's default (benchmarks/attention_blocks.py).
# Each script measures its dtype's dense-matmul peak in the same run and prints utilisation
# against it; compare with the data sheet (H100 SXM 989 TFLOP/s bf16 dense, H200 the same).
#
#   bash benchmarks/device_suite.sh               # sizes for one H100/H200
#   TRAIN_BATCH=2 DECODE_BATCH=2 STEPS="8" bash benchmarks/device_suite.sh   # a CPU smoke run
#
# Install JAX for the device first (README, "Accelerators").
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"
# JAX's GPU client takes 75% of the memory by default. The fp32 train step at batch 128 needs
# 60.25 GiB on an H100, above 75% of its 79.6 GiB (`python -m maskgit_jax.aot_compile
# --config=configs/imagenet256.py --topology=h100:1 --config.mesh.shape="(1,1,1)"
# --pretokenized --config.training.batch_size=128 --config.training.compute_dtype=float32`).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

TRAIN_BATCH="${TRAIN_BATCH:-128}"
DECODE_BATCH="${DECODE_BATCH:-256}"
STEPS="${STEPS:-8 12 16}"
REPEATS="${REPEATS:-3}"

python -c "import jax; print('devices:', jax.devices())"
echo "== 1. train step, batch ${TRAIN_BATCH}"
python benchmarks/train_speed.py --batch "${TRAIN_BATCH}" --steps "${REPEATS}" \
  --dtypes float32 bfloat16
echo "== 2. decoding, batch ${DECODE_BATCH}, T = ${STEPS}"
# shellcheck disable=SC2086  # STEPS is a list of numbers.
python benchmarks/sample_speed.py --batch "${DECODE_BATCH}" --steps ${STEPS} \
  --repeats "${REPEATS}" --dtypes float32 bfloat16
echo "== 3. MaskGIT vs autoregressive (KV cache), bf16, batch ${DECODE_BATCH}"
# shellcheck disable=SC2086
python benchmarks/decode_speed.py --batch "${DECODE_BATCH}" --steps ${STEPS} \
  --repeats "${REPEATS}" --dtype bfloat16
echo "== 4. attention implementations, bf16, batch 8 and ${DECODE_BATCH}"
python benchmarks/attention_blocks.py --batch 8 "${DECODE_BATCH}" --dtypes bfloat16 \
  --repeats "${REPEATS}"
