"""Model update lifecycle on the device: slots, downloads, activation and rollback."""
