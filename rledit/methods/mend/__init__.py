"""MEND: per-token rank-1 updates from an identity-initialised network. Importing this package registers the
method "mend"."""

from rledit.methods.mend.config import MENDHparams
from rledit.methods.mend.method import MENDMethod, MENDNetwork

__all__ = ["MENDHparams", "MENDMethod", "MENDNetwork"]
