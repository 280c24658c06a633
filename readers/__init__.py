"""The reader library used inside inference workers (never imports the daemon)."""
