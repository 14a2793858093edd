"""Errors that mean "the input is wrong": the entry points print them without a stack trace."""


class UserError(Exception):
    """Bad input (config, checkpoint, data) with a message that names the fix."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, foreign or from another model."""


def near_keys(overrides: list[str], config_name: str, limit: int = 3) -> dict[str, list[str]]:
    """For each ``key=value`` override (no ``+``/``~``/``++`` prefix) whose key is not in the composed config
    ``config_name``, the existing keys nearest to it (difflib): ``model.lrr`` -> ``model.lr`` ... Composes the config
    with the other overrides (so an experiment's keys count); empty when it cannot be composed at all."""
    import difflib
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf


    plain = [o for o in overrides if "=" in o and not o.startswith(("+", "~")) and not o.startswith("hydra")]
    group_like = [o for o in plain if "." not in o.split("=", 1)[0]]  # experiment=..., model=...: config groups
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
            cfg = compose(config_name, overrides=group_like)
    except Exception:
        return {}
    finally:
        GlobalHydra.instance().clear()

    keys: list[str] = []

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                keys.append(f"{prefix}{k}")
                walk(v, f"{prefix}{k}.")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    known = set(keys)
    found: dict[str, list[str]] = {}
    for override in plain:
        key = override.split("=", 1)[0]
        if "." in key and key not in known:
            parent, leaf = key.rsplit(".", 1)
            siblings = {k.rsplit(".", 1)[1]: k for k in keys if "." in k and k.rsplit(".", 1)[0] == parent}
            if siblings:  # a key of the same group, by its last part: model.optimizer.lrr -> lr
                found[key] = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=limit, cutoff=0.6)]
            else:
                found[key] = difflib.get_close_matches(key, keys, n=limit, cutoff=0.6)
    return found


def suggest_on_failure(main: object, config_name: str) -> None:
    """Run a Hydra entry ``main``; if it exits with an error and an override names a key the config lacks, print the
    nearest existing keys after Hydra's message."""
    import sys

    try:
        main()  # type: ignore[operator]
    except SystemExit as e:
        if e.code not in (0, None):
            for key, near in near_keys(sys.argv[1:], config_name).items():
                hint = f"did you mean {' or '.join(near)}?" if near else "no similar key exists"
                print(f"error: the config has no key {key}: {hint} (+{key}=... adds a new key)", file=sys.stderr)
        raise
