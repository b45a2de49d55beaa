"""A served session's life, without HTTP: the engine session plus what the server attached to it, the registry, its
supervisor."""
