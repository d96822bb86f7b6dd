"""Budget-driven auto-compression: ``onnxopt search`` and :func:`onnxopt.search`.

Per-layer sensitivity probes, an allocation of per-layer choices under an error budget,
every candidate built by a pipeline of registered passes and measured on onnxruntime, the
Pareto front with the presets beside it, and the choice validated on unseen data. Jobs
run in this process or as Ray tasks (:mod:`.executors`); Ray is imported only when used.
"""

from .driver import DEFAULT_TIME_BUDGET, SearchResult, search

__all__ = ["search", "SearchResult", "DEFAULT_TIME_BUDGET"]
