"""Sweeps: expand a grid of theory configs, run them on a local pool or Ray, keep every result in one SQLite store.

    spec.py       sweep files -> validated, keyed runs
    store.py      results.sqlite: one row per run
    executors.py  local process pool and Ray behind one interface
    worker.py     one run in a worker
    runner.py     the driver: plan, execute, record, resume
    progress.py   a bar over runs on a terminal, plain lines otherwise
    report.py     aggregate over seeds: tables, line plots, phase diagrams, the study's sentences
"""
