"""A real, local x402 payment test bed: a LiteSVM bank, the official x402 facilitator over it,
and paid endpoints (the official SDK middleware for v2, hand-built v1, an own SSE endpoint).

Nothing here is mocked: payments are Solana transactions that the official facilitator verifies,
co-signs and executes on LiteSVM, and balances move on that ledger.
"""
