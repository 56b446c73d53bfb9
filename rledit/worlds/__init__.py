"""MaskWorld and ShiftWorld: editing a trained network's weights as a reinforcement-learning problem.

``rledit worlds run --hparams hparams/worlds/<world>-<task>.yaml`` runs one world × task end to end
(:func:`rledit.worlds.run.run_world`); the environments themselves are plain ``gymnasium`` envs.
"""

from rledit.worlds.env import EditWorld, MaskWorld, ShiftWorld, WorldConfig, WorldError, make_world

__all__ = ["EditWorld", "MaskWorld", "ShiftWorld", "WorldConfig", "WorldError", "make_world"]
