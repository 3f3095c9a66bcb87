"""MQTT: client, SQLite store-and-forward outbox, Home Assistant discovery, request/response."""
