"""The instrumented pass. ``stats`` has the frozen results (numpy only)."""
