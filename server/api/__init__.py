"""The HTTP resources of the core: sessions, avatars, live controls, speak, `/metrics`; the state and request helpers
every handler shares."""
