#!/bin/bash
# Heavy runs of issue 12: the one-seed demo, then the 3-seed results run (cached: reuses seed 0).
cd /work/wt-12
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PREFECT_HOME=$PWD/.prefect-home DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "demo start $(date -u +%FT%TZ)"
s=$(date +%s)
nice -n 10 .venv/bin/python -m flows.pipeline
echo "demo rc=$? end $(date -u +%FT%TZ) seconds=$(( $(date +%s) - s ))"
s=$(date +%s)
nice -n 10 .venv/bin/python -m flows.pipeline --seeds 3 \
  --set "methods=[base,lora,trajectory_mean,soup_own,model_soup,cond_pdiff,cond_pdiff_shared,icm_lora]"
echo "seeds rc=$? end $(date -u +%FT%TZ) seconds=$(( $(date +%s) - s ))"
