"""The old import paths of the client side, kept working: the client now lives in the top-level package
`vexpress_rt_client` (importable in a bot project that has a `server.py` of its own), and these modules re-export it.
"""
