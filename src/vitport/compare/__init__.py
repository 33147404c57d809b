"""Compare a device's Features with a reference: metrics, thresholds and the verdict."""
