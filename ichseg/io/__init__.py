"""File formats: the only NIfTI reading and writing of ichseg (:mod:`ichseg.io.nifti`)."""
