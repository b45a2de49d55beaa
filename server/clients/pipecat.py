"""Kept for old imports: the Pipecat service is `vexpress_rt_client.pipecat`."""

from vexpress_rt_client.pipecat import VExpressVideoService

__all__ = ["VExpressVideoService"]
