"""step3vl benchmarks: ``make bench`` runs every registered entry in one process, writes
``bench/results.json`` and regenerates ``BENCHMARKS.md`` from it.

- ``stats``: medians, spreads, paired ratios of interleaved rounds (pure, unit-tested),
- ``registry``: ``@benchmark(name, title)`` and the ``Result`` an entry returns,
- ``context``: what entries share in one run (data prep output, tokenizer, a work directory) and
  ``project_steps``, which times the project's own training loop step by step,
- ``machine``: machine description, the CPU share other processes take during a sample, ``timed``,
- ``entries/``: one module per benchmark, discovered at start-up; ``conf/``: configs entries run,
- ``run.py``: the entry point; ``render.py``: results.json → BENCHMARKS.md (and ``--check``),
- ``gpu.py``: GPU benchmarks for a lent CUDA machine (training MFU of a ~1B config, vLLM vs torch
  rollouts); not part of ``make bench``.

Adding an entry: a new ``bench/entries/<name>.py`` with ``@benchmark("<name>", "<title>")`` on
``fn(ctx) -> Result``; time comparisons with ``stats.interleave`` (pass ``accept`` to re-run rounds
a busy machine spoiled, within ``extra_s``: a busy machine makes figures **contended**, never an
endless run), record ``Result.figure`` / ``Result.ratio`` and a ``method`` paragraph,
then ``make bench`` and commit results.json with the regenerated BENCHMARKS.md.
"""
