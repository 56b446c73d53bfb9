"""AlphaEdit: MEMIT's locate-then-edit step with the update projected onto the null space of the preserved
keys. Importing this package registers the method "alphaedit"."""

from rledit.methods.alphaedit.config import AlphaEditHparams
from rledit.methods.alphaedit.method import AlphaEditMethod, nullspace_projection

__all__ = ["AlphaEditHparams", "AlphaEditMethod", "nullspace_projection"]
