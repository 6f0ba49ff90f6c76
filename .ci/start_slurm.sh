#!/usr/bin/env bash
# Start a single-node SLURM (Debian's slurm-wlm + munge) for the cluster tests and print what they need.
# Usage: eval "$(bash .ci/start_slurm.sh)"   -> exports MEDSEL_TEST_SLURM_PARTITION
# Runs as root on these machines: proctrack/linuxproc and task/none need no cgroup setup; no slurmdbd, so the
# tests (and the follower) never rely on `sacct`.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
skip() { echo "echo 'SLURM not started ($1); cluster tests will skip' >&2"; exit 0; }
command -v slurmctld >/dev/null 2>&1 || skip "slurm-wlm not installed"
command -v munged >/dev/null 2>&1 || skip "munge not installed"

# munge: one key, a running daemon.
$SUDO mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
$SUDO chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
$SUDO chmod 0400 /etc/munge/munge.key
$SUDO chmod 0700 /etc/munge
if ! munge -n >/dev/null 2>&1; then
  $SUDO -u munge munged --force 2>/dev/null || $SUDO munged --force 2>/dev/null || skip "munged did not start"
fi
for _ in $(seq 1 20); do munge -n >/dev/null 2>&1 && break; sleep 0.5; done
munge -n >/dev/null 2>&1 || skip "munge does not answer"

HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
CONF_DIR=/etc/slurm
$SUDO mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
$SUDO tee "$CONF_DIR/slurm.conf" >/dev/null <<EOF
ClusterName=medsel
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120): short for the tests.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF

$SUDO pkill -x slurmctld 2>/dev/null || true
$SUDO pkill -x slurmd 2>/dev/null || true
sleep 1
$SUDO slurmctld -c -f "$CONF_DIR/slurm.conf" || skip "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
$SUDO slurmd -f "$CONF_DIR/slurm.conf" || skip "slurmd did not start (see /var/log/slurm/slurmd.log)"
for _ in $(seq 1 30); do
  STATE=$(sinfo -h -o '%T' 2>/dev/null | head -1 || true)
  case "$STATE" in idle*|mix*|alloc*) break ;; esac
  sleep 1
done
case "${STATE:-}" in idle*|mix*|alloc*) ;; *) $SUDO scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;; esac
sinfo -h -o '%T' 2>/dev/null | grep -qE 'idle|mix|alloc' || skip "node not idle: $(sinfo -h -o '%T %E' 2>/dev/null | head -1)"
echo "export MEDSEL_TEST_SLURM_PARTITION=debug"
