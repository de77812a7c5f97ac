#!/usr/bin/env bash
# Tear down what slurm/dev-cluster/up.sh started: jobs, slurmd nodes, slurmctld, munged (only when
# up.sh started it), the namespaces, the bridge, the /etc/hosts lines, the state directory.
# Safe to run twice, or when nothing is up.
set -uo pipefail

DIR="${DISTFT_DEVCLUSTER_DIR:-/tmp/distft-dev-cluster}"
TAG="# distft-dev-cluster"
[ "$(id -u)" = 0 ] || { echo "dev-cluster: needs root; run it with sudo" >&2; exit 1; }

stop() {  # stop the process in pid file $1: TERM, then KILL after 5 s
  local pid
  [ -s "$1" ] || return 0
  pid="$(cat "$1")"
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
}

if [ -f "$DIR/slurm.conf" ]; then
  SLURM_CONF="$DIR/slurm.conf" timeout 5 scancel --quiet --full --user=root 2>/dev/null || true
fi
for pidfile in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid"; do
  [ -e "$pidfile" ] && stop "$pidfile"
done
# Job steps left by a killed slurmd (slurmstepd) in our namespaces.
for ns in $(ip netns list 2>/dev/null | awk '/^dft-n[0-9]+/ {print $1}'); do
  for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
  ip netns del "$ns" 2>/dev/null
done
ip link del dftbr0 2>/dev/null
sed -i "/$TAG\$/d" /etc/hosts 2>/dev/null
if [ -e "$DIR/run/munged.ours" ]; then
  pkill -u munge -x munged 2>/dev/null
fi
rm -rf "$DIR"
echo "dev-cluster: down"
