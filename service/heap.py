"""The cyclic garbage collector kept off the objects that live as long as the served model.

Python's collector scans every object it tracks in each full collection, and a server holds millions that
never become garbage (the libraries' modules, classes and functions, the model's tables of ids and
titles). On the 4-layer quickstart model at concurrency 32 a full collection came every 4 s and took
206-211 ms with the interpreter held, every request in flight waiting: p99 326 ms against a 96 ms p50.
With the objects alive after start-up frozen (gc.freeze: the collector no longer scans them; reference
counting still frees them) the full collections took 1.4-1.8 ms and p99 fell to 158 ms
(docs/benchmarks.md, "Full garbage collections").
"""

from __future__ import annotations

import gc


def freeze_long_lived() -> None:
    """Collect what is garbage now, then keep every object still alive out of later collections. Called
    once the server is ready and again after each reload: the earlier freeze is undone first, so that
    the replaced model can be collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
