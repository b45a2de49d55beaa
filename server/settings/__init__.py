"""The server's settings: `vexpress-rt serve` flags, `VEXPRESS_*` variables, defaults, validation."""
