"""ichseg: intracranial hemorrhage segmentation on head CT.

Reproduces and extends Hssayeni et al. 2020 (U-Net on 160x160 windows of CT slices, PhysioNet
CT-ICH). The package is importable piece by piece: ``ichseg.data`` (readers, phantom, folds,
windows, DataModule), ``ichseg.models``, ``ichseg.eval``; entry points live in ``ichseg.train``,
``ichseg.report`` and ``ichseg.predict``.
"""

from ichseg.errors import IchsegError

__version__ = "0.1.0"
__all__ = ["IchsegError", "__version__"]
