"""What runs at inference time: the skipping experts forward, low-bit expert storage, counters."""
