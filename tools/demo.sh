#!/usr/bin/env bash
# `make demo`: the sample int8 models on sample input, then the daemon publishing over MQTT.
set -euo pipefail
BIN="${BIN:-.venv/bin}"
S=agent/samples
I=$S/inputs

echo "== edge-agent infer: int8 digit classifier (LiteRT) on the sample digits"
"$BIN/edge-agent" infer $S/digits-classifier-tflite $I/digit_*.png
echo
echo "== the same network exported to ONNX (int8 QDQ) on onnxruntime"
"$BIN/edge-agent" infer $S/digits-classifier-onnx $I/digit_3.png $I/digit_7.png
if [ -d $S/digits-detector ]; then
    echo
    echo "== int8 detector (YOLO-style grid, decoded + NMS by the agent) on sample scenes"
    "$BIN/edge-agent" infer $S/digits-detector $I/scene_*.png
fi
echo
echo "== int8 anomaly model over sensor windows (the anomalous stretch is flagged)"
"$BIN/edge-agent" infer $S/sensor-anomaly $I/sensor_anomalous.csv | sed -n '14,34p'
echo
echo "== latency of the int8 classifier (1 thread)"
"$BIN/edge-agent" bench $S/digits-classifier-tflite --seconds 2 --threads 1
echo
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
if [ ! -x "$MOSQUITTO" ]; then
    echo "== (Mosquitto is not installed: sudo apt-get install mosquitto mosquitto-clients to see the MQTT part)"
    exit 0
fi
tmp=$(mktemp -d)
cleanup() { kill "$(cat "$tmp/sub.pid" 2>/dev/null)" "$(cat "$tmp/broker.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
port=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$tmp/mosquitto.conf"
[ "$(id -u)" = 0 ] && echo "user root" >> "$tmp/mosquitto.conf"
"$MOSQUITTO" -c "$tmp/mosquitto.conf" > "$tmp/broker.log" 2>&1 &
echo $! > "$tmp/broker.pid"
sleep 0.5
if command -v mosquitto_sub > /dev/null; then
    mosquitto_sub -p "$port" -t 'edge/#' -v > "$tmp/sub.txt" 2>&1 &
    echo $! > "$tmp/sub.pid"
fi
echo "== edge-agent run: the embedded default daemon (2 pipelines) publishing to a private Mosquitto on port $port"
STATE_DIRECTORY="$tmp/state" "$BIN/edge-agent" run --broker "mqtt://127.0.0.1:$port" --device-id demo --duration 6 \
    --log-format text 2> "$tmp/agent.log" | sed -n '1,12p'
sleep 0.5
if [ -f "$tmp/sub.txt" ]; then
    echo
    echo "== what a subscriber on edge/# received ($(wc -l < "$tmp/sub.txt") messages; a few of them):"
    grep -m1 'edge/demo/status' "$tmp/sub.txt" | cut -c1-200
    grep -m2 'results/digits' "$tmp/sub.txt" | cut -c1-200
    grep -m1 'results/vibration' "$tmp/sub.txt" | cut -c1-200
    grep 'edge/demo/status' "$tmp/sub.txt" | tail -n1 | cut -c1-200
fi
