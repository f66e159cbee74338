"""The model registry: the `challenger` and `champion` aliases, promotion and rollback.

    .venv/bin/python -m jobs.registry show              # versions and aliases
    .venv/bin/python -m jobs.registry rollback          # champion back to the version it replaced
    .venv/bin/python -m jobs.registry promote --version 7

Every promotion tags the new champion with the version it replaced (``promoted_from``), and a
rollback reads that tag. The tracking server is the one in config (``mlflow.tracking_uri``); an
unreachable server is an error naming it, never a new empty local registry.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from reccore.config import Config, load_config

log = logging.getLogger("jobs.registry")

CHAMPION = "champion"
CHALLENGER = "challenger"
PROMOTED_FROM = "promoted_from"


class RegistryError(RuntimeError):
    """The tracking server is unreachable, or the registry is not in the state a command needs."""


def client_for(config: Config):
    """Return an MlflowClient for the configured tracking server, after checking that it responds."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = config.mlflow.tracking_uri
    if not uri.startswith(("http://", "https://", "databricks")):
        raise RegistryError(f"mlflow.tracking_uri {uri!r} is not a tracking server URL; "
                            "set it to the server's http(s) address")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means the server cannot be used
        raise RegistryError(f"MLflow tracking server {uri} is not reachable ({type(error).__name__}: "
                            f"{str(error)[:200]}); start it with `.venv/bin/python -m devstack up` or fix "
                            "mlflow.tracking_uri") from error
    return client


def alias_version(client, name: str, alias: str) -> Optional[str]:
    """Return the version behind ``alias`` of model ``name``, or None when the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None


def promote(client, name: str, version: str, reason: str) -> Optional[str]:
    """Point `champion` at ``version``; return the version it pointed at before (None for the first)."""
    previous = alias_version(client, name, CHAMPION)
    if previous == str(version):
        log.info("model %s version %s is already the champion", name, version)
        return previous
    client.set_model_version_tag(name, str(version), PROMOTED_FROM, previous or "")
    client.set_registered_model_alias(name, CHAMPION, str(version))
    log.info("model %s: champion moved from version %s to %s (%s)", name, previous, version, reason)
    return previous


def rollback(client, name: str) -> str:
    """Move `champion` back to the version the current champion replaced; return that version."""
    current = alias_version(client, name, CHAMPION)
    if current is None:
        raise RegistryError(f"model {name} has no champion to roll back")
    previous = client.get_model_version(name, current).tags.get(PROMOTED_FROM, "")
    if not previous:
        raise RegistryError(f"model {name} version {current} replaced no earlier champion, so there is "
                            "nothing to roll back to; promote a version by number instead")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, current, "rolled_back", "true")
    log.info("model %s: champion rolled back from version %s to %s", name, current, previous)
    return previous


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="registry", description="Model aliases in the MLflow registry.")
    parser.add_argument("--env", default=None, help="config environment (conf/<env>.yaml)")
    parser.add_argument("command", choices=("show", "promote", "rollback"))
    parser.add_argument("--version", help="model version for promote")
    parser.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    args = parser.parse_args(argv)
    config = load_config(args.env)
    name = config.training.model_name
    try:
        client = client_for(config)
        champion = alias_version(client, name, CHAMPION)
        if args.command == "show" or args.dry_run:
            challenger = alias_version(client, name, CHALLENGER)
            log.info("model %s on %s: champion %s, challenger %s", name, config.mlflow.tracking_uri, champion,
                     challenger)
            if args.dry_run and args.command == "rollback" and champion:
                target = client.get_model_version(name, champion).tags.get(PROMOTED_FROM, "") or "nothing"
                log.info("dry run: rollback would move champion from %s to %s", champion, target)
            elif args.dry_run and args.command == "promote":
                log.info("dry run: promote would move champion from %s to %s", champion, args.version)
            return 0
        if args.command == "promote":
            if not args.version:
                log.error("promote needs --version N")
                return 2
            promote(client, name, args.version, "promoted by hand")
            return 0
        rollback(client, name)
        return 0
    except RegistryError as error:
        log.error("%s", error)
        return 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
