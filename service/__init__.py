"""The online side of cllm4rec: the recommendation server (see docs/serving.md)."""

import os

# OpenMP threads that spin while waiting for work keep a core busy; with another process on that
# core, PyTorch on CPU slows down many times over. It has to be set before torch is first imported,
# and every way into the server (the `cllm4rec` command, `uvicorn service.app:...`) imports this
# package first. An operator's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
