"""The server's settings come from one declaration each (server/settings/): every setting has a flag (both
spellings) and a `VEXPRESS_*` variable that give the same value, a default, and a row in README's table, which is
the output of `python -m server.settings --markdown`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from kit.paths import REPO_ROOT

from server.settings.config import ConfigError, IceServer, ServerConfig, add_serve_arguments, unknown_variables


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser


def _samples(tmp_path: Path) -> dict[str, tuple[str, object]]:
    """A value other than the default that the setting accepts: (as typed, as the config holds it), for the
    settings whose value is not a number or a path."""
    styles = tmp_path / "styles.json"
    styles.write_text(json.dumps({"mine": {"audio_attention_weight": 2.0}}))
    return {
        "host": ("::1", "::1"),
        "fps": ("50", 50),
        "steps": ("3", 3),
        "preset": ("low_latency", "low_latency"),
        "jpeg_quality": ("40", 40),
        "max_sessions_per_key": ("3", 3),
        "decoder": ("full", "full"),
        "dtype": ("fp32", "fp32"),
        "device": ("cpu", "cpu"),
        "devices": ("cpu,cpu", "cpu,cpu"),
        "outputs": ("off", "off"),
        "styles": (str(styles), str(styles)),
        "tts_command": ("say -o {out} {text}", "say -o {out} {text}"),
        "ice_server": ("stun:stun.example.org:3478", [IceServer(("stun:stun.example.org:3478",))]),
        "ice_host": ("127.0.0.1", ["127.0.0.1"]),
        "api_key": ("k", "k"),
        "allowed_host": ("App.Example.com", ["app.example.com"]),
        "allowed_origin": ("https://app.example.com", ["https://app.example.com"]),
        "trusted_proxy": ("10.0.0.0/8", ["10.0.0.0/8"]),
        "turn_url": ("turn:turn.example.org:3478", ["turn:turn.example.org:3478"]),
        "output_allow": ("127.0.0.1:1935", ["127.0.0.1:1935"]),
    }


# settings that are only valid together with another (the checks across settings)
COMPANIONS = {
    "turn_secret": {"turn_url": "turn:turn.example.org:3478"},
    "turn_url": {"turn_secret": "s3cret"},
    "tls_cert": {"tls_key": "/k.pem"},
    "tls_key": {"tls_cert": "/c.pem"},
}


def _sample(name: str, kind: str, default: object, samples: dict) -> tuple[str | None, object]:
    """(the flag's argument, None for a flag without one; the value the config then holds)."""
    if name in samples:
        return samples[name]
    if kind == "bool":
        return None, not default
    if kind == "int":
        return str(default * 2), default * 2
    if kind == "float":
        return f"{default * 2:g}", default * 2
    return "/srv/vexpress/x", "/srv/vexpress/x"


def test_every_setting_has_a_flag_a_variable_and_a_default_that_agree(tmp_path):
    """Iterate ServerConfig's fields: each one's flag (both spellings) and its VEXPRESS_* variable set it to the
    same value, its default is what neither gives, its --help names the variable, and `serve` does not warn
    about the variable."""
    parser = _parser()
    helps = {a.dest: a.help for a in parser._actions}
    defaults = ServerConfig.from_args(parser.parse_args([]), {})
    samples = _samples(tmp_path)
    for f in fields(ServerConfig):
        default = f.default if f.default_factory is MISSING else f.default_factory()
        assert getattr(defaults, f.name) == default, f.name
        text, value = _sample(f.name, str(f.type), default, samples)
        assert value != default, f.name
        negated = f.type == "bool" and default is True  # --no_admission
        flag = f"no_{f.name}" if negated else f.name
        variable = f"VEXPRESS_{f.name.upper()}"
        assert variable in (helps.get(f.name) or ""), f"--{flag}'s help does not name {variable}"
        assert unknown_variables({variable: "1"}) == [], variable
        companion = COMPANIONS.get(f.name, {})
        companion_argv = [a for k, v in companion.items() for a in (f"--{k}", v)]
        companion_env = {f"VEXPRESS_{k.upper()}": v for k, v in companion.items()}
        for spelling in {f"--{flag}", f"--{flag.replace('_', '-')}"}:
            argv = [spelling] + ([] if text is None else [text]) + companion_argv
            args, unknown = parser.parse_known_args(argv)
            assert not unknown, f"{spelling} is not a flag of serve"
            given = ServerConfig.from_args(args, {})
            assert getattr(given, f.name) == value, (spelling, getattr(given, f.name))
        env_text = str(int(value)) if text is None else text  # a bool: VEXPRESS_ADMISSION=0
        from_env = ServerConfig.from_env({variable: env_text, **companion_env})
        assert getattr(from_env, f.name) == value, (variable, getattr(from_env, f.name))


def test_the_flag_wins_over_the_variable_and_a_bad_variable_names_its_setting():
    parser = _parser()
    both = ServerConfig.from_args(parser.parse_args(["--jpeg_quality", "40"]), {"VEXPRESS_JPEG_QUALITY": "60"})
    assert both.jpeg_quality == 40
    with pytest.raises(ConfigError, match="--jpeg_quality must be an integer from 1 to 95"):
        ServerConfig.from_env({"VEXPRESS_JPEG_QUALITY": "96"})
    with pytest.raises(ConfigError, match="--outputs 'x' is not one of on, off, api-key"):
        ServerConfig.from_args(parser.parse_args(["--outputs", "x"]), {})  # a flag as its variable: one message
    with pytest.raises(ConfigError, match="--subscriber_queue_frames must be at least 1"):
        ServerConfig.from_args(parser.parse_args(["--subscriber_queue_frames", "0"]), {})


def _readme_table() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    header = "| flag | default | what |"
    assert text.count(header) == 1, "README has one settings table"
    start = text.index(header)
    return text[start : text.index("\n\n", start) + 1]


def test_readme_settings_table_is_the_generated_one():
    """README's table is `python -m server.settings --markdown`'s output, and names every field's flag."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "server.settings", "--markdown"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    readme = _readme_table()
    assert readme == done.stdout, "README's settings table is stale: paste `python -m server.settings --markdown`"
    flags_column = "\n".join(line.split(" | ")[0] for line in readme.splitlines()[2:])
    for f in fields(ServerConfig):
        negated = f.type == "bool" and f.default is True
        spelled = {f"`--{n}`" for n in (f.name, f.name.replace("_", "-"))}
        if negated:
            spelled = {f"`--no_{f.name}`", f"`--no-{f.name.replace('_', '-')}`"}
        assert any(s in flags_column for s in spelled), f"README's table has no row for {f.name}"
