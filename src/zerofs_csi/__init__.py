"""zerofs-csi: a CSI driver for block volumes served by ZeroFS over NBD."""

# The one place the version is written: pyproject.toml reads it from here. A literal, not
# importlib.metadata, which costs every start of the plugin (and of each process it runs)
# about two seconds under the test bed's emulated CPU.
__version__ = "0.1.0"

DRIVER_NAME = "zerofs.csi.driver"
