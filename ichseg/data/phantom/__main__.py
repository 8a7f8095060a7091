"""``python -m ichseg.data.phantom``: the phantom command (:mod:`ichseg.cli.phantom`)."""

from ichseg.cli.phantom import main

if __name__ == "__main__":
    raise SystemExit(main())
