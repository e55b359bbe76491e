"""llmitm's composition root: ``mitmdump -s addons/gateway.py``.

The addons in the order a request meets them (responses travel the same list). Each reads what
the ones before it decided from ``flow.metadata`` (keys in llmitm/flowmeta.py) and adds its own.
"""

from configuration import Configuration
from identify import Identify
from resolve import Resolve, UpstreamProbe
from streams import Streams

addons = [
    Configuration(),  # 1. load and watch llmitm_config; one validated snapshot per request
    Resolve(),  # 2. llmitm_resolve: where the TCP connection goes
    Identify(),  # 3. provider, endpoint kind, bypass; strips X-Llmitm-* headers
    Streams(),  # 4. SSE responses stream through one pipeline (stages/taps added below)
    UpstreamProbe(),  # last before the wire: a dead upstream gets a 502 in the provider's shape
]
