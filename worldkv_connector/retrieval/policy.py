"""Retrieval scoring policies behind a name registry (``pose``, ``fov``): the interface.

A policy scores candidate chunks against the query chunk; **lower is better**. Interface::

    score(cand_t [N, 3], cand_R [N, 3, 3], q_t [3], q_R [3, 3], valid=None) -> [N] float64

All arrays are float64 numpy (camera-to-world, OpenCV axes, see ``worldkv_connector.retrieval.poses``).
``valid`` is an optional ``[N]`` bool mask: rows outside it score ``+inf`` and take no part in
any normalisation over the candidates (the index uses it for sink/recent exclusion without
copying the candidate arrays). A policy may also offer
``shortlist(cand_t, cand_R, q_t, q_R, k, valid=None) -> (rows, dist)``, a subset of rows holding
the k best with their exact scores, which ``PoseIndex.query`` then uses instead of ``score``; and
``prepare(cand_t, cand_R) -> [..., N]``, per-chunk data the index computes once at insert, keeps
beside the poses and passes to ``shortlist`` as ``prepared=``.
A policy whose ``orthonormal`` attribute is true wants proper
rotations in ``cand_R`` (``PoseIndex`` passes the SVD-orthonormalised chunk means); otherwise it
gets the raw element-wise mean rotation, as the WorldKV reference uses.

A new policy is one class decorated with ``@register_policy("name")``: ``WorldKVConfig.policy``
accepts every registered name, and ``PoseIndex.from_config`` builds the policy with its
``from_config(config)`` classmethod (``RetrievalPolicy``'s takes no knob from the config).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from worldkv_connector.registry import Registry

__all__ = ["POLICIES", "RetrievalPolicy", "register_policy", "get_policy", "orthonormalize", "check_valid"]

POLICIES: Registry[type] = Registry("scoring policy")


class RetrievalPolicy:
    """Base of the registered policies: the class attributes ``PoseIndex`` reads and the default
    ``from_config``. Subclasses add ``score`` (and optionally ``shortlist``, ``prepare``)."""

    name: str = ""  # set by ``register_policy``
    orthonormal = False  # True: ``cand_R`` holds proper rotations (see the module docstring)

    @classmethod
    def from_config(cls, config) -> "RetrievalPolicy":
        """The policy a ``WorldKVConfig`` asks for; a policy with knobs in the config overrides it."""
        return cls()


def register_policy(name: str) -> Callable[[type], type]:
    """Class decorator adding a scoring policy to ``POLICIES`` under ``name``."""
    add = POLICIES.register(name)

    def deco(cls: type) -> type:
        add(cls)  # raises on a name registered twice, before the class is touched
        cls.name = name
        return cls

    return deco


def get_policy(name: str, **kwargs):
    """An instance of the registered policy ``name`` built with ``kwargs``."""
    return POLICIES.get(name)(**kwargs)


def orthonormalize(rot: np.ndarray) -> np.ndarray:
    """Nearest proper rotation (SVD, det +1) of each matrix. rot: [..., 3, 3] -> same shape."""
    u, _, vt = np.linalg.svd(np.asarray(rot, dtype=np.float64))
    d = np.sign(np.linalg.det(u @ vt))
    d = np.where(d == 0, 1.0, d)  # degenerate mean (e.g. opposite views averaged): keep U V^T
    u = u.copy()
    u[..., :, 2] *= d[..., None]
    return u @ vt


def check_valid(n: int, valid) -> np.ndarray | None:
    """The ``valid`` mask of a policy call as ``[n]`` bool (None stays None); a wrong shape raises."""
    if valid is None:
        return None
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (n,):
        raise ValueError(f"valid must have shape [{n}], got {list(valid.shape)}")
    return valid
