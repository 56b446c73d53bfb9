"""UltraEdit-style training-free closed form. Importing this package registers the method "ultraedit"."""

from rledit.methods.ultraedit.config import UltraEditHparams
from rledit.methods.ultraedit.method import UltraEditMethod

__all__ = ["UltraEditHparams", "UltraEditMethod"]
