"""A world where memory matters: the procedural panorama world (ground truth for any pose), the
training of the world model on it, and the revisit eval (full vs sliding vs WorldKV)."""
from worldkv_connector.world.panorama import WORLD_VERSION, PanoramaWorld, WorldConfig, render, yaw_pose
from worldkv_connector.world.weights import shipped_manifest, shipped_weights

__all__ = ["WORLD_VERSION", "PanoramaWorld", "WorldConfig", "render", "yaw_pose", "shipped_weights",
           "shipped_manifest"]
