"""objective component (see docs/ARCHITECTURE.md)."""
