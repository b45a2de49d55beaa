"""Running the server: building the engine from the settings, TLS, serving the app in this process."""
