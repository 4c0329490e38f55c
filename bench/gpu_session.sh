#!/usr/bin/env bash
# One device session: CUDA parity tests, then the saliency benchmarks, JSON into $OUT.
# Each stage runs on its own so that one failure does not lose the others' figures.
# The device image lacks captum, saliency and pydicom: fetch their wheels here first, into .whl/
# (ignored by git via .git/info/exclude), and name .whl in the run's carry list:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl captum==0.9.0 saliency==0.2.1 pydicom==3.0.1
# The metric benchmark (bench/metrics_bench.py --device cuda) is left out: its figures did not
# change with the engine; add it back when the metrics change.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/monai_bundle:$PWD || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, sys; print(sys.version, torch.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu 2>&1 | grep -E "^E |passed|failed" | tail -15 > "$OUT/pytest_gpu.log"
cat "$OUT/pytest_gpu.log"
timeout 200 python3 bench/saliency_bench.py --out "$OUT" --device cuda --arch densenet121 \
  --dtype float32 --batch 32 --rows 64 128 --references pair 2>&1 | grep -v -i warn | tail -30
timeout 110 python3 bench/saliency_bench.py --out "$OUT" --device cuda --arch inception_v3 \
  --dtype float32 --batch 32 --rows 64 128 --references 2>&1 | grep -v -i warn | tail -30
# Last, so that a slow stage above cannot cost the fp32 figures: bf16 autocast against the bf16 floor.
timeout 100 python3 bench/saliency_bench.py --out "$OUT" --device cuda --arch densenet121 \
  --dtype bfloat16 --batch 32 --rows 64 128 --references 2>&1 | grep -v -i warn | tail -30
