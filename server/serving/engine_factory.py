"""Build the streaming engine from the server settings: resolve the device(s), load the weights, say what is missing.

`build_pool` (what `serve` runs): one engine per device of `--devices`; `build_engine`: one engine on `--device`."""

from __future__ import annotations

import logging

from streaming.device_pool import DevicePool, device_names, parse_devices
from streaming.sim.profile import is_simulated
from vexpress_rt.errors import WeightsError
from vexpress_rt.weights import ModelPaths

from ..settings.config import ServerConfig

log = logging.getLogger("server")


def resolve_device(name: str):
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("CUDA is not available; serving from the CPU (real time only with a tiny model)")
        return torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str, device):
    from vexpress_rt.loader import DTYPES

    if name == "auto":
        return DTYPES["fp16" if device.type == "cuda" else "fp32"]
    return DTYPES[name]


def weights_report(config: ServerConfig) -> list[str]:
    """What `vexpress-rt check-weights` says about the model folder: each item, then how to get the weights."""
    from vexpress_rt.check import check_model_folder

    return check_model_folder(ModelPaths.from_model_dir(config.model_dir)).lines()


def resolve_devices(config: ServerConfig) -> list[str]:
    """`--devices` ("all", "cuda:0,cuda:1", "cpu,cpu"); without it `--device`, where the default "cuda" means every
    visible GPU. No CUDA: one CPU worker (a warning)."""
    import torch

    spec = config.devices or ("all" if config.device == "cuda" else config.device)
    items = parse_devices(spec)
    if items == ["all"]:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        items = [f"cuda:{i}" for i in range(count)] or ["cuda"]  # "cuda" falls back to the CPU below
    return [item if is_simulated(item) else str(resolve_device(item)) for item in items]


def build_pool(config: ServerConfig) -> DevicePool:
    """One engine per device (not started), each with its own copy of the weights. Raises WeightsError."""
    devices = resolve_devices(config)
    pool = DevicePool([build_engine(config, device) for device in devices], device_names(devices))
    if len(devices) > 1:
        log.info("serving from %d devices: %s", len(devices), ", ".join(pool.names))
    return pool


def build_engine(config: ServerConfig, device: str | None = None):
    """The engine on `device` (default `--device`; not started). Raises WeightsError when the model folder is
    incomplete or wrong."""
    from streaming.decoder import load_decoders
    from streaming.engine import Engine, EngineConfig
    from streaming.session_config import SessionConfig
    from vexpress_rt.loader import load_models

    if is_simulated(device or config.device):
        return build_simulated_engine(config, device or config.device)
    device = resolve_device(device or config.device)
    dtype = resolve_dtype(config.dtype, device)
    paths = ModelPaths.from_model_dir(config.model_dir)
    if not paths.denoising_unet_path.parent.is_dir():
        raise WeightsError(f"model folder not found: {paths.denoising_unet_path.parent}")
    models = load_models(paths, device=device, dtype=dtype)
    decoder, decoders = load_decoders(models, config.decoder, paths.taesd_path)
    log.info("decoder: %s by default (available: %s)", decoder, ", ".join(decoders))
    return Engine(
        models,
        EngineConfig(
            width=config.width,
            height=config.height,
            max_sessions=config.max_sessions,
            cache_dir=config.cache_dir,
            avatar_memory_bytes=int(config.avatar_cache_mb * 2**20),
            avatar_disk_bytes=int(config.cache_dir_mb * 2**20),
            admission=config.admission,
            default_session=config.session_defaults(SessionConfig(fps=config.fps, decoder=decoder)),
        ),
        decoders,
    )


def build_simulated_engine(config: ServerConfig, device: str):
    """The engine on a simulated device (`sim:h100`, streaming/sim/): no weights, the model's calls wait what the
    profile measured, frames are the portrait marked "SIMULATED". For design and tests, never a product mode."""
    from streaming.engine import Engine, EngineConfig
    from streaming.session_config import SessionConfig
    from streaming.sim.device import simulated_device

    sim = simulated_device(device, config.width, config.height, None if config.dtype == "auto" else config.dtype)
    decoder = "tiny" if config.decoder == "auto" else config.decoder
    log.warning(
        "SIMULATED device %s: no model runs; each call waits the time profile %r gives (%s, %s); frames are the "
        "portrait marked SIMULATED",
        sim.name,
        sim.profile.name,
        sim.profile.device,
        sim.profile.source.get("measured", "source in the profile"),
    )
    return Engine(
        sim.models(),
        EngineConfig(
            width=config.width,
            height=config.height,
            max_sessions=config.max_sessions,
            cache_dir=None,  # nothing worth keeping: a simulated avatar is its picture
            admission=config.admission,
            pipelined=True,  # as on CUDA, the device it stands for
            device_name=sim.name,
            simulated=sim.describe(),
            default_session=config.session_defaults(SessionConfig(fps=config.fps, decoder=decoder)),
        ),
        sim.decoders(),
    )
