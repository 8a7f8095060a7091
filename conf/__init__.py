"""Hydra configuration tree of ichseg (installed as the package ``ichseg.conf``)."""
