"""Helpers the tests share (never fixtures: those live in conftest files)."""
