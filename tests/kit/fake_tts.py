"""A TTS command for the tests: `fake_tts.py MODE RECORD_DIR TEXT OUT`. It records TEXT as the next numbered file
in RECORD_DIR (0.txt, 1.txt...), then `slow`: sleeps 120 s (a TTS that hangs); `speak`: writes 0.2 s of a quiet
tone to OUT as a 16 kHz WAV."""

from __future__ import annotations

import os
import sys
import time
import wave
from pathlib import Path

import numpy as np


def record(folder: Path, text: str) -> None:
    for index in range(10_000):
        try:
            fd = os.open(folder / f"{index}.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return


def main() -> None:
    mode, folder, text, out = sys.argv[1:5]
    record(Path(folder), text)
    if mode == "slow":
        time.sleep(120)
        return
    tone = (0.1 * np.sin(2 * np.pi * 220 * np.arange(3200) / 16000) * 32767).astype("<i2")
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(tone.tobytes())


if __name__ == "__main__":
    main()
