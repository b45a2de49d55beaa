"""SDP for trickle ICE (RFC 8840): split the candidates off an offer, read its ICE credentials, write an sdpfrag."""

from __future__ import annotations

TRICKLE_TYPE = "application/trickle-ice-sdpfrag"


def split_candidates(sdp: str) -> tuple[str, list[tuple[str, str]]]:
    """An SDP without its `a=candidate` and `a=end-of-candidates` lines, and the candidates it had as
    (mid, `a=candidate:...` line): what a trickling client posts, then sends later."""
    kept, held, mid = [], [], "0"
    for line in sdp.splitlines():
        if line.startswith("a=mid:"):
            mid = line[len("a=mid:") :]
        if line.startswith("a=candidate:"):
            held.append((mid, line))
        elif line != "a=end-of-candidates":
            kept.append(line)
    return "\r\n".join(kept) + "\r\n", held


def ice_credentials(sdp: str) -> tuple[str, str]:
    ufrag = next(ln.split(":", 1)[1] for ln in sdp.splitlines() if ln.startswith("a=ice-ufrag:"))
    pwd = next(ln.split(":", 1)[1] for ln in sdp.splitlines() if ln.startswith("a=ice-pwd:"))
    return ufrag, pwd


def sdpfrag(ufrag: str, pwd: str, candidates: list[tuple[str, str]], end: bool = True) -> str:
    """An RFC 8840 fragment: the ICE credentials, then per mid its m-line, candidates and end-of-candidates."""
    lines = [f"a=ice-ufrag:{ufrag}", f"a=ice-pwd:{pwd}"]
    mids = sorted({mid for mid, _ in candidates}) or ["0"]
    for mid in mids:
        lines += ["m=audio 9 UDP/TLS/RTP/SAVPF 0", f"a=mid:{mid}"]
        lines += [line for m, line in candidates if m == mid]
        if end:
            lines.append("a=end-of-candidates")
    return "\r\n".join(lines) + "\r\n"
