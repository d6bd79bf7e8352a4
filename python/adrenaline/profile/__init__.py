"""Measured cost curves for the load-aware offload policy; ``python -m adrenaline.profile`` makes them."""

from adrenaline.core.profile import Curve, Grid, Profile, load_profile, save_profile

__all__ = ["Curve", "Grid", "Profile", "load_profile", "save_profile"]
