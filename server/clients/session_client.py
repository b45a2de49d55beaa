"""Kept for old imports: the session client is `vexpress_rt_client.session`."""

from vexpress_rt_client.session import AvatarSession, SessionLost, SessionOptions

__all__ = ["AvatarSession", "SessionLost", "SessionOptions"]
