"""Retrieval: which banked chunks go back into the window. The pose index (``index``: chunk poses
per session, top-k by a policy), the scoring policies behind a name registry (``policy``: the
interface and ``POLICIES``; ``pose_policy``, ``fov_policy``: one file per policy) and the
camera-pose maths (``poses``: validation, chunk means, interpolation; ``trajectory``: the
revisit grammar and action integration). numpy only: the scheduler half holds poses, not tensors."""
from worldkv_connector.retrieval.fov_policy import FovPolicy
from worldkv_connector.retrieval.index import PoseIndex
from worldkv_connector.retrieval.policy import POLICIES, RetrievalPolicy, get_policy, orthonormalize, register_policy
from worldkv_connector.retrieval.pose_policy import PosePolicy
from worldkv_connector.retrieval.poses import chunk_mean_pose, chunk_poses, validate_poses
from worldkv_connector.retrieval.trajectory import integrate_actions, parse_trajectory, trajectory_poses

__all__ = [
    "PoseIndex", "POLICIES", "RetrievalPolicy", "register_policy", "get_policy", "PosePolicy", "FovPolicy",
    "orthonormalize", "validate_poses", "chunk_mean_pose", "chunk_poses", "parse_trajectory", "trajectory_poses",
    "integrate_actions",
]
