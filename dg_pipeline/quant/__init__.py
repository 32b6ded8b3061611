"""quant component (see docs/ARCHITECTURE.md)."""
