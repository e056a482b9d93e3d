#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests: munge + slurmctld + slurmd n1 + slurmd n2.
#   local_cluster.sh start DIR   -> writes DIR/slurm.conf, starts the daemons, waits until both nodes are idle
#   local_cluster.sh stop DIR    -> stops the daemons this script started (by their recorded PIDs)
# Clients must run with SLURM_CONF=DIR/slurm.conf. Needs root and Debian's slurmctld slurmd slurm-client munge.
set -euo pipefail

cmd=${1:?start|stop}
dir=$(realpath -m "${2:?state directory}")
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

start() {
  mkdir -p "$dir/state" "$dir/spool/n1" "$dir/spool/n2"
  # Node names must resolve: they are also the rendezvous address of the jobs' first rank.
  grep -qE '^127\.0\.0\.1[[:space:]].*\bn1\b' /etc/hosts || echo "127.0.0.1 n1 n2" >> /etc/hosts

  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge
  chown munge:munge /run/munge
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    echo "munged already running: using it (not stopped by this script)"
  else
    # The PID file lives in /run/munge: munged runs as `munge`, which cannot enter a private test folder.
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid --socket=/run/munge/munge.socket.2 \
      --force
    cp /run/munge/munged.pid "$dir/munged.pid"
  fi
  local host
  host=$(hostname)
  cat > "$conf" <<CONF
ClusterName=pausetest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
MinJobAge=4
ReturnToService=2
KillWait=30
JobAcctGatherType=jobacct_gather/none
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=16818 CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=16819 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  /usr/sbin/slurmctld -f "$conf" -i
  /usr/sbin/slurmd -f "$conf" -N n1
  /usr/sbin/slurmd -f "$conf" -N n2
  for _ in $(seq 1 60); do
    if [ "$(sinfo -h -o '%t' | sort -u | tr -d '\n')" = "idle" ]; then
      sinfo
      return 0
    fi
    sleep 1
  done
  echo "nodes did not come up:" >&2
  sinfo >&2 || true
  tail -n 20 "$dir"/*.log >&2 || true
  return 1
}

stop() {
  for pidfile in "$dir"/slurmd.n1.pid "$dir"/slurmd.n2.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
    if [ -s "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
    fi
  done
  sleep 1
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
