"""Build-time helpers run from the clone (Makefile targets); never installed."""
