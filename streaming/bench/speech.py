"""Speech-like audio for the benchmarks (16 kHz int16): a voiced tone at a syllable rate.

Timing does not depend on what is said, so the benchmarks need no recording; the strategies comparison measures
agreement between two runs on the same input, which any voiced signal serves.
"""

from __future__ import annotations

import numpy as np

RATE = 16000


def speech(seconds: float) -> np.ndarray:
    """`seconds` of a 140 Hz voiced tone with harmonics, its loudness rising and falling 3 times a second."""
    t = np.arange(int(seconds * RATE)) / RATE
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in (1, 2, 3))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (6000 * voice * envelope).astype(np.int16)
