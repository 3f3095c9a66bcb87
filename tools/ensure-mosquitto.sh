#!/usr/bin/env bash
# Tests start their own Mosquitto on free ports; make sure the binary is installed.
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    echo "ensure-mosquitto: installing mosquitto with apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients
    exit 0
fi
echo "ensure-mosquitto: Mosquitto is missing; run: sudo apt-get install mosquitto mosquitto-clients" >&2
exit 1
