"""Tests for measuring; run them with ``python -m twisted.trial measuring``."""
