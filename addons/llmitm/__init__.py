"""llmitm's pure logic: nothing in this package imports mitmproxy.

The addon classes in ``addons/*.py`` are thin glue over these modules, so everything here can be
unit-tested and benchmarked without a proxy.
"""
