"""Running the server: building the engine from the settings, TLS."""
