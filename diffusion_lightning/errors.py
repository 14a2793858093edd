"""Errors that mean "the input is wrong": the entry points print them without a stack trace; the checks of an entry's
command line before Hydra composes it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Bad input (config, checkpoint, data) with a message that names the fix."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, foreign or from another model."""


#: The Hydra config folder of the package (conf/ beside it).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _group_overrides(overrides: list[str]) -> list[str]:
    """The overrides that choose config groups (``experiment=...``, ``model=...``, ``net@model.net=...``): they decide
    which keys exist."""
    return [o for o in overrides if "=" in o and not o.startswith(("~", "hydra"))
            and (CONF_DIR / o.split("=", 1)[0].lstrip("+").split("@")[0]).is_dir()]  # fmt: skip


def _compose(overrides: list[str], config_name: str) -> dict[str, Any] | None:
    """The config ``config_name`` under the group choices of ``overrides`` (unresolved; not to be changed), or None
    when it cannot be composed at all (Hydra then says why)."""
    return _compose_groups(tuple(_group_overrides(overrides)), config_name)


@functools.lru_cache(maxsize=16)
def _compose_groups(groups: tuple[str, ...], config_name: str) -> dict[str, Any] | None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=list(groups))
        return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - Hydra reports it itself when the entry composes
        return None
    finally:
        GlobalHydra.instance().clear()


def dotted_keys(config: dict[str, Any]) -> dict[str, Any]:
    """Every dotted key of a nested config with its value."""
    found: dict[str, Any] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                found[f"{prefix}{k}"] = v
                walk(v, f"{prefix}{k}.")

    walk(config, "")
    return found


def near_keys(overrides: list[str], config_name: str, limit: int = 3) -> dict[str, list[str]]:
    """For each ``key=value`` override (no ``+``/``~``/``++`` prefix) whose key is not in the composed config
    ``config_name``, the existing keys nearest to it (difflib): ``model.lrr`` -> ``model.lr`` ... Composes the config
    with the group choices among the overrides (so an experiment's keys count); empty when it cannot be composed."""
    import difflib

    config = _compose(overrides, config_name)
    if config is None:
        return {}
    keys = list(dotted_keys(config))
    known = set(keys)
    found: dict[str, list[str]] = {}
    for override in overrides:
        if "=" not in override or override.startswith(("+", "~", "hydra")):
            continue
        key = override.split("=", 1)[0]
        if "." in key and key not in known:
            parent, leaf = key.rsplit(".", 1)
            siblings = {k.rsplit(".", 1)[1]: k for k in keys if "." in k and k.rsplit(".", 1)[0] == parent}
            if siblings:  # a key of the same group, by its last part: model.optimizer.lrr -> lr
                found[key] = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=limit, cutoff=0.6)]
            else:
                found[key] = difflib.get_close_matches(key, keys, n=limit, cutoff=0.6)
    return found


#: Keys with a numeric default that also take words: ``trainer.devices=auto``, ``precision=bf16``, ``steps=ddim25``.
WORDS_ALLOWED = ("devices", "precision", "steps", "num_nodes")


def _is_sweep(value: str) -> bool:
    """A multirun value (``1,2,3``, ``range(...)``, ``choice(...)``, ``glob(...)``) or an interpolation."""
    return "," in value or "(" in value or "${" in value


def prepare_overrides(overrides: list[str], config_name: str) -> list[str]:
    """Check and complete the command line of an entry before Hydra composes it:

    * a value that cannot have the type of the key's default (``trainer.max_steps=abc``) is a
      :class:`UserError` naming the key, instead of a ``TypeError`` from deep inside the object it configures;
    * where the config has no ``sampler`` (``sample``, ``evaluate``: the checkpoint's own), ``sampler.<key>=...``
      without ``sampler=<name>`` changes the checkpoint's own sampler (it becomes ``+sampler.<key>=...``, merged over
      it by :meth:`~diffusion_lightning.models.DiffusionModel.sampler_spec`); beside a sweep over samplers
      (``sampler=ddim,dpmpp``) it becomes ``++sampler.<key>=...``.
    """
    if any(o.startswith("sampler=") and _is_sweep(o.partition("=")[2]) for o in overrides):
        # a multirun over samplers (evaluate -m sampler=ddim,dpmpp sampler.steps=10,20): Hydra composes the sweep's
        # primary config without the swept group, where sample's and evaluate's config has no sampler, so the
        # sampler's keys must be forced in (each job then merges them over its sampler)
        overrides = [f"++{o}" if o.startswith("sampler.") else o for o in overrides]
    groups = set(_group_overrides(overrides))
    if all(o in groups or "=" not in o or o.startswith(("+", "~", "hydra")) for o in overrides):
        return overrides  # only group choices and new keys (make train): nothing to check, no second composition
    config = _compose(overrides, config_name)
    if config is None:
        return overrides
    keys = dotted_keys(config)
    own_sampler = "sampler" not in keys and not any(o.startswith("sampler=") for o in overrides)
    out = []
    for override in overrides:
        key, _, value = override.partition("=")
        if not _ or key.startswith(("+", "~", "hydra")):
            out.append(override)
            continue
        if key.startswith("sampler.") and own_sampler:
            override = f"+{override}"  # a sweep too: evaluate -m sampler.steps=10,20
        if _is_sweep(value):
            out.append(override)
            continue
        default = None if key.rsplit(".", 1)[-1] in WORDS_ALLOWED else keys.get(key)
        if isinstance(default, bool) and value.lower() not in ("true", "false", "null"):
            raise UserError(f"{override}: {key} is true or false (its default is {str(default).lower()})")
        if isinstance(default, int | float) and not isinstance(default, bool) and value != "null":
            kind = "an integer" if isinstance(default, int) else "a number"
            try:
                float(value) if isinstance(default, float) else int(float(value))
            except ValueError:
                raise UserError(f"{override}: {key} is {kind} (its default is {default})") from None
        out.append(override)
    return out


def run_entry(main: Callable[[], None], config_name: str) -> None:
    """Run a Hydra entry ``main`` on the command line checked and completed by :func:`prepare_overrides` (a bad
    value: one line and exit status 2); if it exits with an error and an override names a key the config lacks,
    print the nearest existing keys after Hydra's message."""
    import sys

    try:
        sys.argv[1:] = prepare_overrides(sys.argv[1:], config_name)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None):
            for key, near in near_keys(sys.argv[1:], config_name).items():
                hint = f"did you mean {' or '.join(near)}?" if near else "no similar key exists"
                print(f"error: the config has no key {key}: {hint} (+{key}=... adds a new key)", file=sys.stderr)
        raise
