"""llmitm's composition root: ``mitmdump -s addons/gateway.py``.

The addons in the order a request meets them (responses travel the same list). Each reads what
the ones before it decided from ``flow.metadata`` (keys in llmitm/flowmeta.py) and adds its own.
"""

from concurrency import Concurrency
from configuration import Configuration
from control import Control
from guard import Guard
from identify import Identify
from payments import Payments
from recorder import Recorder
from repair import Repair
from resolve import Resolve, UpstreamProbe
from session_headers import SessionHeaders
from streams import Streams

addons = [
    Configuration(),  # load and watch llmitm_config; one validated snapshot per request
    Resolve(),  # llmitm_resolve: where the TCP connection goes
    Identify(),  # provider, endpoint, bypass, session (407), turn headers (400); strips X-Llmitm-*
    Control(),  # answers http://llmitm.internal/ itself; nothing there goes upstream
    SessionHeaders(),  # session and per-turn headers, with provenance in the flow comment
    Payments(),  # x402: presign from cached requirements; a 402 is paid and re-sent via a 307
    Streams(),  # SSE responses stream through one pipeline; later addons add stages and taps
    Repair(),  # tool-call repair: a stage on the SSE pipeline, JSON bodies in `response`
    Guard(),  # last look before the wire: secrets out of scope or session are marked (or 403)
    Concurrency(),  # limits.concurrency: queue beyond N in flight per host pattern (503 on timeout)
    UpstreamProbe(),  # last before the wire: a dead upstream gets a 502 in the provider's shape
    Recorder(),  # last of all: each finished flow appended, redacted, to <session>-<day>.mitm
]
