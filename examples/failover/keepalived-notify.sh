#!/usr/bin/env bash
# A keepalived notify script that makes a libmirror node follow its VRRP state: MASTER promotes
# the node, BACKUP and FAULT demote it. libmirror never decides *when* to fail over (two nodes
# cannot tell a dead peer from a partition); a cluster manager does, and this wires one to it.
#
# keepalived.conf, on each of the two machines (docs/FAILOVER.md):
#
#   vrrp_instance mirror {
#       state BACKUP
#       nopreempt
#       interface eth0
#       virtual_router_id 51
#       priority 100
#       virtual_ipaddress { 10.0.0.100/24 }
#       notify "/usr/local/lib/mirror/keepalived-notify.sh /var/lib/mirror/node.queue"
#   }
#
# keepalived calls it with: QUEUE TYPE NAME STATE [PRIORITY]. The node is the running `mirror`
# process (or the embedding application) whose queue file is QUEUE: the commands reach it through
# its control socket, QUEUE.ctl.
#
# Promotion is never forced here: a backup still connected to a live primary refuses it (the
# VRRP election and the mirror disagree, which an operator must look at), and this script exits
# non-zero so that keepalived logs it. Set MIRROR_FORCE_PROMOTE=1 to force it (the old primary is
# then fenced at its first contact: it completes no more writes).
set -uo pipefail

queue=${1:?usage: keepalived-notify.sh QUEUE TYPE NAME STATE [PRIORITY], or QUEUE STATE by hand}
if [ $# -eq 2 ]; then state=$2; else state=${4:-}; fi
mirror=${MIRROR_BIN:-mirror}
log() { logger -t mirror-notify -- "$*" 2>/dev/null || true; echo "mirror-notify: $*" >&2; }

case "$state" in
  MASTER)
    force=()
    [ "${MIRROR_FORCE_PROMOTE:-0}" = 1 ] && force=(--force)
    # The old primary's death reaches the backup within its ack timeout: retry the refusal
    # "connected to a live primary" for a while before giving up.
    for _ in $(seq 1 50); do
      if out=$("$mirror" promote "${force[@]}" "$queue" 2>&1); then
        log "$out"
        exit 0
      fi
      case "$out" in
        *"already a primary"*) log "already the primary"; exit 0 ;;
        *peer_alive*) sleep 0.1 ;;
        *) log "promote failed: $out"; exit 1 ;;
      esac
    done
    log "promote refused: the backup is still connected to a live primary: $out"
    exit 1
    ;;
  BACKUP | FAULT | STOP)
    if out=$("$mirror" demote "$queue" 2>&1); then
      log "$out"
      exit 0
    fi
    case "$out" in
      *"already a backup"*) log "already a backup"; exit 0 ;;
      *) log "demote failed: $out"; exit 1 ;;
    esac
    ;;
  *)
    log "unknown state '$state' (expected MASTER, BACKUP, FAULT or STOP)"
    exit 2
    ;;
esac
