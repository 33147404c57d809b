"""Honest benchmarking: device-synchronised timing, FLOP counts and roofline peaks."""
