#!/usr/bin/env bash
# The network-fault suite in one command (backends/tests/nats_network_faults.rs):
# PostgreSQL, NATS (one server, then a three-node cluster), the relay and a
# subscribing service as separate hosts (network namespaces) joined by a wire
# the test controls; partitions, delay, loss, a NATS restart during a
# partition, a cluster's stream leader killed and moved — under writes. Prints
# figures per fault; asserts no stale read, no lost event, no unjustified gap.
#
#   bash backends/tests/netns/run.sh            # the CI variant: 5 s partitions, 8 s of delay/loss
#   bash backends/tests/netns/run.sh --long     # 30 s partitions and windows
#   bash backends/tests/netns/run.sh clean      # remove what a killed run left (namespaces, processes in them)
#   bash backends/tests/netns/run.sh -- one_nats  # arguments after -- go to the test binary (a name filter)
#
# Needs root (network namespaces, /dev/net/tun), iproute2, nats-server and
# PostgreSQL's server binaries; as root on Debian it installs the last two if
# missing. `cargo test --workspace --all-features` (CI's `.ci/test`) runs the
# same test; it skips, saying why, where it cannot run.
set -euo pipefail
cd "$(dirname "$0")/../../.."

namespaces=(pgcw_nats pgcw_relay pgcw_n1 pgcw_n2 pgcw_n3)

clean() {
  for ns in "${namespaces[@]}"; do
    if ip netns list 2>/dev/null | grep -qw "^$ns"; then
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      sleep 0.2
      ip netns del "$ns" 2>/dev/null || true
      echo "removed network namespace $ns" >&2
    fi
  done
}

long=0
test_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    clean) clean; exit 0 ;;
    --long) long=1 ;;
    --) shift; test_args=("$@"); break ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$(id -u)" != 0 ]; then
  echo "the network-fault suite needs root (network namespaces, TUN devices)" >&2
  exit 1
fi
command -v ip >/dev/null || { echo "iproute2 (ip) is missing" >&2; exit 1; }
if ! command -v nats-server >/dev/null && [ ! -x /usr/sbin/nats-server ]; then
  echo "installing nats-server" >&2
  apt-get update -qq && apt-get install -y -qq nats-server >/dev/null
fi
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "installing postgresql" >&2
  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
fi

export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}"
export CARGO_PROFILE_TEST_DEBUG="${CARGO_PROFILE_TEST_DEBUG:-line-tables-only}"
# The relay runs as its own process on its own host: the CLI binary, built
# first so that the test runs today's relay.
cargo build -p pgcachewatch-cli --bin pgcachewatch
export PGCW_NETFAULTS_REQUIRE=1 PGCW_NETFAULTS_LONG="$long"
exec cargo test -p pgcachewatch-backends --features nats,replication \
  --test nats_network_faults -- --nocapture --test-threads=1 "${test_args[@]}"
