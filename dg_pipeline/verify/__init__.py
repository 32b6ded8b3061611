"""verify component (see docs/ARCHITECTURE.md)."""
