#!/usr/bin/env bash
# Every measurement the GPU is needed for, in stages, each writing its output under OUT_DIR:
#   tests     tests/test_ms_deform_attn_gpu.py (bf16/fp16 against float64, no host sync, compile)
#   tune      benchmarks/tune_ms_deform_attn.py --dtype bf16 (launch configs for tuning.py)
#   kernel    benchmarks/ms_deform_attn.py, bf16 and fp32
#   backbone  benchmarks/backbone_attention_paths.py, backbone alone and with UperNet
# Usage: benchmarks/gpu_session.sh OUT_DIR [STAGE ...]   (default: all four, in that order)
# Run from the repository root, with torch, triton, hydra-core and omegaconf importable.
set -uo pipefail

out_dir=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [tests|tune|kernel|backbone ...]}
shift
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests tune kernel backbone)
mkdir -p "$out_dir"
export PYTHONUNBUFFERED=1
status=0

run() {  # run NAME COMMAND...: tee the output to OUT_DIR/NAME, remember a failure, go on
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out_dir/$name" || status=1
}

{
    echo "commit: ${COMER_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out_dir/environment.txt" 2>&1
cat "$out_dir/environment.txt"

for stage in "${stages[@]}"; do
    case $stage in
        tests) run gpu_tests.txt python -m pytest -q -p no:cacheprovider tests/test_ms_deform_attn_gpu.py ;;
        tune) run tuning.md python benchmarks/tune_ms_deform_attn.py --dtype bf16 ;;
        kernel)
            run kernel_bf16.md python benchmarks/ms_deform_attn.py --dtype bf16
            run kernel_fp32.md python benchmarks/ms_deform_attn.py --dtype fp32 ;;
        backbone)
            run backbone.md python benchmarks/backbone_attention_paths.py
            run backbone_upernet.md python benchmarks/backbone_attention_paths.py --with-heads ;;
        *) echo "unknown stage $stage (tests, tune, kernel, backbone)" >&2; exit 2 ;;
    esac
done
exit $status
