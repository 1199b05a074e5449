"""Command implementations for the CLI; each module is imported only when its command runs."""
