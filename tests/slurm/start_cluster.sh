#!/usr/bin/env bash
# Start a real single-machine SLURM cluster for the tests: munge, mariadb + slurmdbd (submitit polls sacct;
# without accounting a cancelled job's result() hangs), slurmctld and two simulated nodes (node1, node2) that both
# run here. Needs root; installs Debian's packages when they are missing. Idempotent: a running cluster is reused.
#
#   bash tests/slurm/start_cluster.sh        # prints `export SLURM_CONF=...` as its last line
#   bash tests/slurm/stop_cluster.sh         # stops what this script started (by pid) and wipes the state
#
# Everything lives under $FSDP_FT_SLURM_DIR (default /tmp/fsdp-ft-slurm); nothing is written to /etc/slurm, so
# clients must see SLURM_CONF=$FSDP_FT_SLURM_DIR/slurm.conf.
set -euo pipefail
D=${FSDP_FT_SLURM_DIR:-/tmp/fsdp-ft-slurm}
export SLURM_CONF=$D/slurm.conf
log() { echo "[slurm-cluster] $*" >&2; }

if [ "$(id -u)" != 0 ]; then echo "start_cluster.sh: needs root (it starts munge, mariadb and slurm daemons)" >&2; exit 1; fi

# Test files that use the cluster may run in several pytest processes at once (pytest-xdist gives each file to one
# worker): starting and stopping take turns under one lock (held by flock, not by the daemons started here), and each
# pytest process that started or reused the cluster is noted in $D/users/PID; stop_cluster.sh called from pytest
# stops the cluster only once no other noted process is alive.
if [ "${FSDP_FT_SLURM_LOCKED:-}" != "$D" ]; then
  exec env FSDP_FT_SLURM_LOCKED="$D" FSDP_FT_SLURM_CALLER="$PPID" flock -o "$D.lock" bash "$0" "$@"
fi
register() { [ -z "${PYTEST_CURRENT_TEST:-}" ] || { mkdir -p "$D/users" && : > "$D/users/$FSDP_FT_SLURM_CALLER"; }; }

healthy() {  # controller up, nodes usable, and accounting answering (submitit polls sacct; without it job states
             # read UNKNOWN and a cancelled job's result() hangs)
  scontrol ping 2>/dev/null | grep -q UP && sinfo -h -o %T 2>/dev/null | grep -qv -e down -e unk \
    && timeout 20 sacct -n -X -o JobID >/dev/null 2>&1
}
if [ -f "$D/slurmctld.pid" ]; then
  if healthy; then register; log "already running"; echo "export SLURM_CONF=$SLURM_CONF"; exit 0; fi
  # a cluster left half-dead (say mariadb stopped under a running slurmdbd) cannot be patched in place:
  # stop what its pid files name and start afresh
  log "the cluster in $D is not healthy (controller, nodes or accounting down): restarting it"
  FSDP_FT_SLURM_FORCE=1 bash "$(dirname "$0")/stop_cluster.sh"
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  log "installing slurm, munge, slurmdbd, mariadb (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge slurmdbd \
    mariadb-server >/dev/null
fi

mkdir -p "$D"/{state,spool,log}
host=$(hostname -s)

# munge: the key comes with the package; /run/munge must belong to munge
if ! munge -n >/dev/null 2>&1; then
  [ -f /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || /usr/sbin/create-munge-key -f; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  echo started > "$D/munge.started"
fi

# mariadb for slurmdbd
sock=/run/mysqld/mysqld.sock
if ! mysqladmin --socket=$sock ping >/dev/null 2>&1; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  mariadbd --user=mysql --datadir=/var/lib/mysql --socket=$sock --skip-networking=0 --bind-address=127.0.0.1 \
    --pid-file=/run/mysqld/fsdp-ft.pid >"$D/log/mariadb.log" 2>&1 &
  for _ in $(seq 300); do mysqladmin --socket=$sock ping >/dev/null 2>&1 && break; sleep 0.1; done
  cp /run/mysqld/fsdp-ft.pid "$D/mariadb.pid"
fi
mysql --socket=$sock -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

cat > "$D/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=16819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile=$D/log/slurmdbd.log
PidFile=$D/slurmdbd.pid
EOF
chmod 600 "$D/slurmdbd.conf"

cat > "$SLURM_CONF" <<EOF
ClusterName=fsdpft
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5   # a requeued job may start again after cred_expire + 1 s (default 121 s)
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
KillWait=5
MinJobAge=300
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=16819
JobAcctGatherType=jobacct_gather/none
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF

slurmdbd
for _ in $(seq 100); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.1; done
sacctmgr -i -Q add cluster fsdpft >/dev/null 2>&1 || true
slurmctld -c -i   # -c: fresh state (job ids restart at 1)
for n in 1 2; do slurmd -N node$n; done
for _ in $(seq 150); do
  [ "$(sinfo -h -N -o %T 2>/dev/null | grep -c idle)" = 2 ] && break; sleep 0.2
done
sinfo -N -h >&2 || true
[ "$(sinfo -h -N -o %T | grep -c idle)" = 2 ] || { echo "start_cluster.sh: nodes did not come up; see $D/log" >&2; exit 1; }
register
log "up"
echo "export SLURM_CONF=$SLURM_CONF"
