"""Models for tests, benchmarks and the demo: deterministic builders (:mod:`models.builders`)
and real pretrained models that ship inside PyPI wheels (:mod:`models.fetch`)."""
