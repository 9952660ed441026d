"""pi-server: the model owner's long-running process (see server.app)."""
