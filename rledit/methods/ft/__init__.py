"""FT: constrained fine-tuning of the edited modules. Importing this package registers the method "ft"."""

from rledit.methods.ft.config import FTHparams
from rledit.methods.ft.method import FTMethod, project_to_norm_ball

__all__ = ["FTHparams", "FTMethod", "project_to_norm_ball"]
