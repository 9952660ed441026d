"""The control plane: control messages, authentication, the service loop, per-session party processes, query limits and the dealer service."""
