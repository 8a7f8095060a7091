"""Lightning callbacks: the stitched evaluation, image galleries, the threshold report."""
