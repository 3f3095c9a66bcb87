"""Predictions on request over MQTT: size limits, a token-bucket rate limit, a bounded work queue.

MQTT 5: the reply goes to the request's response topic with its correlation data.
MQTT 3.1.1: to ``reply_to`` in the payload (``correlation`` echoed), else to ``<prefix>predict/reply``.
Replies only go under the device's own prefix or a configured ``reply_prefixes`` entry.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import structlog

from agent.errors import AgentError
from agent.protocol import PredictRequest, PredictResponse, ProtocolError, b64decode, encode, parse_predict_request

if TYPE_CHECKING:
    from agent.mqtt.service import MqttService

log = structlog.get_logger(__name__)


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; pure apart from the time passed in."""

    def __init__(self, rate: float, burst: int, now: float = 0.0) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens = float(burst)
        self.updated = now

    def allow(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class PredictHandler:
    def __init__(self, service: MqttService) -> None:
        self.service = service
        self.config = service.mqtt.predict
        self.bucket = TokenBucket(self.config.rate, self.config.burst, time.monotonic())
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=8)
        self._worker = threading.Thread(target=self._work, name="predict-requests", daemon=True)
        self._worker.start()
        self.counts = {"requests": 0, "answered": 0, "rejected": 0, "rate_limited": 0}

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(5)

    # paho network thread: cheap checks only
    def on_message(self, message: Any) -> None:
        self.counts["requests"] += 1
        if not self.config.enabled:
            self._reply_error(message, None, "predictions on request are disabled on this device")
            return
        if len(message.payload) > self.config.max_request_bytes:
            self._reply_error(
                message,
                None,
                f"request is {len(message.payload)} bytes, over the {self.config.max_request_bytes}-byte limit",
            )
            return
        if not self.bucket.allow(time.monotonic()):
            self.counts["rate_limited"] += 1
            self._reply_error(message, None, f"rate limited: at most {self.config.rate:g} requests per second")
            return
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self._reply_error(message, None, "busy: too many requests in progress")

    def _work(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            request: PredictRequest | None = None
            try:
                request = parse_predict_request(message.payload, self.config.max_request_bytes)
                name, result = self._predict(request)
            except (ProtocolError, AgentError) as exc:
                self._reply_error(message, request, str(exc))
                continue
            except Exception as exc:  # a bug must not kill the worker
                log.exception("prediction request failed")
                self._reply_error(message, request, f"internal error: {type(exc).__name__}")
                continue
            self.counts["answered"] += 1
            self._reply(message, request, PredictResponse(ok=True, id=request.id, pipeline=name, result=result))

    def _predict(self, request: PredictRequest) -> tuple[str, dict[str, Any]]:
        pipelines = self.service.daemon.pipelines
        if not pipelines:
            raise AgentError("no model is running", "try again when the device is ready")
        name = request.pipeline or next(iter(pipelines))
        pipeline = pipelines.get(name)
        if pipeline is None:
            raise ProtocolError(f"no pipeline named {name!r} (known: {', '.join(pipelines)})")
        predictor = pipeline.predictor
        if request.image is not None:
            data = np.frombuffer(b64decode(request.image, "image"), dtype=np.uint8)
            frame = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
            if frame is None:
                raise ProtocolError("image is not a decodable PNG/JPEG/BMP")
            prediction = predictor.predict_image(frame)
        elif request.tensor is not None:
            arrays = [_tensor(request.tensor)]
            if predictor.kind == "timeseries" and arrays[0].ndim == 2:
                prediction = predictor.predict_window(arrays[0])
            else:
                prediction = predictor.predict_tensors(arrays)
        else:
            assert request.tensors is not None
            prediction = predictor.predict_tensors({k: _tensor(v) for k, v in request.tensors.items()})
        return name, prediction.to_dict()

    # ---- replies ------------------------------------------------------------------------------

    def _reply_error(self, message: Any, request: PredictRequest | None, error: str) -> None:
        self.counts["rejected"] += 1
        log.info("prediction request rejected", topic=message.topic, error=error)
        self._reply(message, request, PredictResponse(ok=False, id=request.id if request else None, error=error))

    def _reply(self, message: Any, request: PredictRequest | None, response: PredictResponse) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        topics = self.service.topics
        props_in = getattr(message, "properties", None)
        response_topic = getattr(props_in, "ResponseTopic", None) if props_in is not None else None
        correlation = getattr(props_in, "CorrelationData", None) if props_in is not None else None
        target = response_topic or (request.reply_to if request else None) or topics.predict_reply
        if not self._allowed(target):
            log.warning("reply topic not allowed, answering on the default", requested=target)
            response.error = (response.error or "") + f" (reply topic {target!r} not allowed)"
            response.ok = False
            target = topics.predict_reply
        if request is not None and request.correlation is not None and correlation is None:
            response.correlation = request.correlation
        properties = None
        if self.service.link.mqtt5:
            properties = Properties(PacketTypes.PUBLISH)
            if correlation is not None:
                properties.CorrelationData = correlation
            properties.ContentType = "application/json"
        payload = encode(response)
        if len(payload) > self.service.mqtt.max_payload_bytes:
            payload = encode(PredictResponse(ok=False, id=response.id, error="result over the payload cap"))
        self.service.link.publish_now(target, payload, qos=1, properties=properties)

    def _allowed(self, topic: str) -> bool:
        if any(c in topic for c in "+#\0") or not topic:
            return False
        return self.service.topics.owns(topic) or any(topic.startswith(p) for p in self.config.reply_prefixes)


def _tensor(data: Any) -> np.ndarray:
    raw = data.decoded()
    dtype = np.dtype(data.dtype).newbyteorder("<")
    expected = int(np.prod(data.shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ProtocolError(f"tensor data is {len(raw)} bytes; shape {data.shape} of {data.dtype} needs {expected}")
    return np.frombuffer(raw, dtype=dtype).reshape(data.shape).astype(dtype.newbyteorder("="))
