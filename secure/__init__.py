"""Secure inference: plans, the two-party runtime, the control plane (see docs/ARCHITECTURE.md)."""

import os

# Party processes are spawned from processes that import this package. With OpenMP's default active
# wait, the server's idle intra-op threads spin between its online convolutions and take the core
# the client needs for its part of the next ReLU round; passive waiting avoids that. Set before any
# child imports torch (libgomp reads it once, at load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
