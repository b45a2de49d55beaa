"""Commands beside `serve`: `present`, `push`, `soak`, `camera` (and its virtual devices)."""
