"""Benchmarks: the scan engine against nmap inside a private network namespace."""
