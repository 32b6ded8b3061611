"""sampling component (see docs/ARCHITECTURE.md)."""
