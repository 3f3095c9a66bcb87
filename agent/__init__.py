"""Edge inference agent: runs quantized models on local input and reports over MQTT."""

__version__ = "0.1.0"
