#!/usr/bin/env bash
# Spark GPU discovery script (spark.executor.resource.gpu.discoveryScript, and the driver's and
# a standalone worker's): prints this host's GPUs in Spark's resource format,
#   {"name": "gpu", "addresses": ["0", "1"]}
# from nvidia-smi's indices. No nvidia-smi: no GPUs (an empty list). Shipped with rddtensor;
# `rddtensor info --gpu-discovery-script` prints this file's path.
set -uo pipefail

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo '{"name": "gpu", "addresses": []}'
  exit 0
fi
if ! indices=$(nvidia-smi --query-gpu=index --format=csv,noheader); then
  echo "get_gpus_resources.sh: nvidia-smi failed; is the NVIDIA driver loaded?" >&2
  exit 1
fi
addresses=""
for i in $indices; do
  case "$i" in
    ''|*[!0-9]*) continue ;;
  esac
  addresses="${addresses:+$addresses, }\"$i\""
done
echo "{\"name\": \"gpu\", \"addresses\": [$addresses]}"
