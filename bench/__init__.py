"""The ctxstore benchmark harness: every figure beside its alternatives and floor, in one run.

``python -m bench`` runs the registered scenarios (``bench.scenarios``) and
writes bench/RESULTS.md, bench/results.json and PNG plots; ``--quick`` runs them
all at tiny sizes, ``--only NAME`` some of them, ``--out DIR`` writes elsewhere.
"""
