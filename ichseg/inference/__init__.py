"""Applying a trained network to whole scans: the one predictor that both the stitched evaluation
and ``ichseg.predict`` use (:class:`Predictor`; docs/predict.md)."""

from ichseg.inference.predictor import Predictor, resolve_autocast

__all__ = ["Predictor", "resolve_autocast"]
