"""The weight-space benchmark: NG-GNN, NG-T and the baselines on zoos built
locally (``python -m benchmarks.weightspace``; :mod:`.run` holds it,
:mod:`.report` its tables and plots)."""
