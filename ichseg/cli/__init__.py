"""The command-line entry points: compose the options, call the library, print.

``ichseg.cli.train`` (``ichseg-train``), ``ichseg.cli.evaluate`` (``ichseg-evaluate``),
``ichseg.cli.predict`` (``ichseg-predict``) and ``ichseg.cli.report`` (``ichseg-report``). Only this
package imports Hydra. See docs/README.md for the map of the package.
"""
