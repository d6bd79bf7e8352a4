"""Capacity planner: a discrete-event simulator of a PD cluster with and without attention
offloading, on analytic GPU models or measured profiles (``python -m adrenaline.sim``)."""
