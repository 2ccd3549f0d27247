"""Default limits of the server, importable without loading the server (for the CLI)."""

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024
