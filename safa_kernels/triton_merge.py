"""Triton plan executor (placeholder until the kernel lands): registers nothing yet."""
AVAILABLE = False
