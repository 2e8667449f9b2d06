"""twistd plugin entry: ``twistd tqserver``. The real work lives in tqserver.tap."""

from twisted.application.service import ServiceMaker

tqserver = ServiceMaker(
    "TQServer",
    "tqserver.tap",
    "Run polyglot workers behind one reverse proxy, with zero-downtime reloads",
    "tqserver",
)
