"""export component (see docs/ARCHITECTURE.md)."""
