"""The ``scrm`` command line. Each module here adds one area's commands to :data:`main`."""

from scrm.channels import channel_types
from scrm.cli import (  # noqa: F401  (they register commands)
    campaigns,
    codes,
    customers,
    io,
    loyalty,
    ops,
    privacy,
    replies,
    reports,
    service,
    staff,
    webhooks,
)
from scrm.cli.base import main

for _kind, _cls in channel_types().items():
    if _cls.cli is not None:
        main.add_command(_cls.cli, _kind)

__all__ = ["main"]
