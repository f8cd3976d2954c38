"""Pretrained weights that users bring, from a local directory or an ``s3://`` prefix.

A prefix is copied to a temporary local directory first (``storage.local_copy``), loaded into
memory, and the copy removed; the models themselves read local directories only.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from models import cosmos
from stages import storage


def load_cosmos(uri: str | os.PathLike, storage_options: dict[str, str] | None = None, *,
                device: str | torch.device = "cpu", **settings: Any) -> cosmos.CosmosWorldModel:
    """A pretrained Cosmos world model (``models.cosmos.load``, ``settings`` are ``CosmosConfig``
    fields) from a local directory or an s3:// prefix; its config records ``uri`` as the source."""
    with storage.local_copy(uri, storage_options) as local:
        return cosmos.load(local, source=str(uri), device=device, **settings)
