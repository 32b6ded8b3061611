"""training component (see docs/ARCHITECTURE.md)."""
