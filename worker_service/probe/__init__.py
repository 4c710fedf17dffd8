"""The scan engine: discovery, interleaved probes of many hosts, adaptive timing, retries,
rate pacing, service identification. Its core imports only the standard library."""
