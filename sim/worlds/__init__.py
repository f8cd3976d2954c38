"""The world registry: ``get(name)`` builds a registered world, ``WORLDS`` lists them.

A world module registers its ``World`` subclass under ``spec.name`` when imported; the built-in
modules are imported lazily here, so listing worlds does not import every simulator.
"""
from __future__ import annotations

import importlib

from sim.worlds.base import DEFAULT, World, WorldConfig, WorldSpec

__all__ = ["BUILTIN", "DEFAULT", "World", "WorldConfig", "WorldSpec", "get", "names", "register", "spec"]

# name -> module that registers it (imported on first use)
BUILTIN = {"carracing": "sim.worlds.carracing", "metaworld-mt10": "sim.worlds.metaworld_mt10"}
_REGISTRY: dict[str, type[World]] = {}


def register(cls: type[World]) -> type[World]:
    """Class decorator: make a world available by its ``spec.name``."""
    _REGISTRY[cls.spec.name] = cls
    return cls


def world_class(name: str) -> type[World]:
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown world {name!r}; registered: {names()}")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTRY))


def spec(name: str) -> WorldSpec:
    return world_class(name).spec


def get(config: WorldConfig | str) -> World:
    """Build a world from its config (or by name, with the spec's defaults)."""
    if isinstance(config, str):
        cls = world_class(config)
        return cls(WorldConfig(name=config, image_size=cls.spec.image_size))
    return world_class(config.name)(config)
