"""The local labelling page: two faces side by side, the maintainer picks the better one."""

from facerestore_cli.data.labelling.server import LabelSession, make_server

__all__ = ["LabelSession", "make_server"]
