#!/usr/bin/env bash
# A real SLURM cluster on this machine: munge, slurmctld and N slurmd nodes, each node in its own
# network namespace (its own hostname and address), joined by a bridge. For the test suite
# (tests/slurm/) and for trying distft's SLURM path without a cluster. Needs root (namespaces,
# daemons); installs slurm-wlm and munge from Debian's packages when they are missing.
#
#   sudo slurm/dev-cluster/up.sh [NODES]      # default 2; prints the line to source, then "ready"
#   export SLURM_CONF=/tmp/distft-dev-cluster/slurm.conf
#   sbatch / srun / squeue / python -m distft launcher=slurm ...
#   sudo slurm/dev-cluster/down.sh
#
# Settings (environment): DISTFT_DEVCLUSTER_DIR (state, logs, slurm.conf; default
# /tmp/distft-dev-cluster), DISTFT_DEVCLUSTER_NET (the private /24's first three octets, default
# 10.213.7), DISTFT_DEVCLUSTER_CPUS (CPUs per node, default 1). Only that /24 and loopback are
# ever addressed. Running up.sh again first tears the previous cluster down.
#
# What mattered (see ../../../shared/ENVIRONMENT.md): slurmd is started with nsenter (not
# `ip netns exec`, which remounts /sys and breaks slurmd's cgroup probe) plus `unshare --uts`
# for its hostname; proctrack/linuxproc and task/none (no cgroups); no accounting daemon.
set -euo pipefail

NODES="${1:-2}"
DIR="${DISTFT_DEVCLUSTER_DIR:-/tmp/distft-dev-cluster}"
NET="${DISTFT_DEVCLUSTER_NET:-10.213.7}"
CPUS="${DISTFT_DEVCLUSTER_CPUS:-1}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BRIDGE=dftbr0
TAG="# distft-dev-cluster"

die() { echo "dev-cluster: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces and the SLURM daemons); run it with sudo"
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || die "NODES must be 1-99, got '$NODES'"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v nsenter >/dev/null \
    || ! command -v ip >/dev/null; then
  echo "dev-cluster: installing slurm-wlm, munge, iproute2 (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine may have no package lists yet: refresh them once if the install fails.
  apt-get install -y -q slurm-wlm munge iproute2 util-linux >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge iproute2 util-linux >/dev/null; } \
    || die "apt-get install slurm-wlm munge failed; install them, then rerun"
fi

"$HERE/down.sh" >/dev/null 2>&1 || true
mkdir -p "$DIR"/{state,log,run,spool}

# munge: one key for the controller and every node (they share this machine's /etc/munge).
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- munged --force
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n >/dev/null 2>&1 || die "munged did not start (see /var/log/munge/munged.log)"
  touch "$DIR/run/munged.ours"
fi

# Network: a bridge holding the controller's address, one namespace per node.
ip link add "$BRIDGE" type bridge
ip addr add "$NET.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
HOSTS=""
for i in $(seq "$NODES"); do
  node="n$i"; addr="$NET.$((10 + i))"
  ip netns add "dft-$node"
  ip link add "dftv$i" type veth peer name eth0 netns "dft-$node"
  ip link set "dftv$i" master "$BRIDGE" up
  ip -n "dft-$node" addr add "$addr/24" dev eth0
  ip -n "dft-$node" link set eth0 up
  ip -n "dft-$node" link set lo up
  HOSTS+="$addr $node $TAG"$'\n'
done
CONTROLLER="$(hostname -s)"
HOSTS+="$NET.1 dftctl $TAG"$'\n'
sed -i "/$TAG\$/d" /etc/hosts
printf '%s' "$HOSTS" >> /etc/hosts

NODELIST="n[1-$NODES]"
[ "$NODES" = 1 ] && NODELIST=n1
cat > "$DIR/slurm.conf" <<EOF
# Written by slurm/dev-cluster/up.sh: $NODES node(s) in network namespaces on $CONTROLLER.
ClusterName=distft-dev
SlurmctldHost=$CONTROLLER($NET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdSpoolDir=$DIR/spool/%n
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
SchedulerType=sched/backfill
# Look for startable jobs every second (default 30 s), so requeued and queued jobs start at once.
SchedulerParameters=bf_interval=1
# Requeued jobs (preemption, time limits) may run again; distft requeues itself on the signal.
JobRequeue=1
# A requeued job waits for its old credentials to expire (default 120 s): 10 s keeps preemption tests short.
AuthInfo=cred_expire=10
NodeName=n[1-99] CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP
EOF
# Only the nodes that exist: rewrite the node line with addresses.
sed -i '/^NodeName=/d' "$DIR/slurm.conf"
for i in $(seq "$NODES"); do
  echo "NodeName=n$i NodeAddr=$NET.$((10 + i)) NodeHostname=n$i CPUs=$CPUS State=UNKNOWN" >> "$DIR/slurm.conf"
done
# The partition line must follow the nodes.
grep -v '^PartitionName=' "$DIR/slurm.conf" > "$DIR/slurm.conf.new"
echo "PartitionName=debug Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP" >> "$DIR/slurm.conf.new"
mv "$DIR/slurm.conf.new" "$DIR/slurm.conf"

export SLURM_CONF="$DIR/slurm.conf"
slurmctld -c -f "$SLURM_CONF"
for i in $(seq "$NODES"); do
  mkdir -p "$DIR/spool/n$i"
  nsenter --net="/var/run/netns/dft-n$i" unshare --uts sh -c "hostname n$i; exec slurmd -f '$SLURM_CONF' -N n$i"
done

for _ in $(seq 120); do
  states="$(sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ')"
  [ "$states" = "idle " ] && [ "$(sinfo -h -N -o '%N' | wc -l)" = "$NODES" ] && break
  sleep 0.5
done
[ "$states" = "idle " ] || die "nodes not idle after 60 s (states: ${states:-none}); logs in $DIR/log"
echo "export SLURM_CONF=$SLURM_CONF"
echo "ready: $NODES node(s) ($NODELIST), partition debug, controller $CONTROLLER ($NET.1)"
