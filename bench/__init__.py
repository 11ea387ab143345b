"""``osteo bench`` / ``python -m bench``: every osteolib throughput figure beside a plain reference measured in
the same process, with the same threads, batch size and architecture (issue 22).

Layout: :mod:`~bench.cli` (arguments), :mod:`~bench.settings` (sizes: full and --quick), :mod:`~bench.suite`
(runs the families, writes the results), :mod:`~bench.plan` (a row: two sides, the load around them),
:mod:`~bench.timing` (step clock, peak memory), :mod:`~bench.machine` (CPU, load, memory), :mod:`~bench.goals`,
:mod:`~bench.report` (JSON and markdown), :mod:`~bench.data` and :mod:`~bench.context` (the images),
:mod:`~bench.fit_path` and :mod:`~bench.plain_training` (the two sides of the training rows),
``families/`` (one module per row family) and ``reference/`` (the plain implementations, free of osteolib).

``predict_throughput.py`` and the near-duplicate benchmarks still run on their own
(``.venv/bin/python bench/<script>.py``); the predict rows use ``predict_throughput``'s functions. The mae,
masked_cnn and precision rows replace the former ``pretrain_throughput.py`` (its last result stays in results/).
"""
