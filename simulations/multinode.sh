#!/usr/bin/env bash
# Run a fedrec simulation on a multi-machine Ray cluster (docs/multinode.md).
#
#   simulations/multinode.sh head   [RAY_PORT]            # on the head machine
#   simulations/multinode.sh worker HEAD_IP[:RAY_PORT]    # on every other machine
#   simulations/multinode.sh run    [fedrec simulate args] # on the head, once workers joined
#   simulations/multinode.sh stop                          # on every machine
#
# Flower's simulation engine calls ray.init(), which joins the cluster named by
# RAY_ADDRESS instead of starting a private one; virtual clients then run as Ray
# actors on every machine's CPUs/GPUs (client-resources-num-cpus/-gpus per client).
# Every machine needs the same Python environment (fedrec installed at the same
# path) and the prepared dataset at the same data.cache-dir (a shared folder, or
# `fedrec prepare` run on each machine with identical settings).
set -euo pipefail
command="${1:-}"; shift || true
case "$command" in
  head)
    ray start --head --port "${1:-6379}" --include-dashboard=false
    ;;
  worker)
    address="${1:?usage: multinode.sh worker HEAD_IP[:RAY_PORT]}"
    [[ "$address" == *:* ]] || address="$address:6379"
    ray start --address "$address"
    ;;
  run)
    ray status
    RAY_ADDRESS="${RAY_ADDRESS:-auto}" exec fedrec simulate "$@"
    ;;
  stop)
    ray stop
    # ray stop leaves the head's address behind; a later ray.init() with no address
    # would try to join that dead cluster and hang.
    rm -f "${RAY_TMPDIR:-/tmp}/ray/ray_current_cluster"
    ;;
  *)
    sed -n '2,14p' "$0"; exit 2
    ;;
esac
