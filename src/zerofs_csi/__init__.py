"""zerofs-csi: a CSI driver for block volumes served by ZeroFS over NBD."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zerofs-csi")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

DRIVER_NAME = "zerofs.csi.driver"
