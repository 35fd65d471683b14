"""Evaluation harness: the METHOD §6 baselines on line completion -> a report directory.

- :mod:`~greencode.evaluation.plan`    settings (a gate on a model at a context fraction) x sample batches
- :mod:`~greencode.evaluation.runner`  the Evaluator that runs settings on batches (in-process or one per Ray actor)
- :mod:`~greencode.evaluation.parts`   one finished (setting, batch) per file, so an interrupted run resumes
- :mod:`~greencode.evaluation.report`  rows, results.json/.csv, report.md and the plots

``workflows/evaluate.py`` spreads the pending batches over Ray actors; :func:`runner.run_evaluation`
does the same work in this process.
"""
