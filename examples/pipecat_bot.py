"""A Pipecat bot with a vexpress-rt face: TTS -> VExpressVideoService -> Pipecat's small WebRTC transport.

The bot greets whoever connects and then repeats what it is sent as text over the data channel (no LLM or STT, to
stay short: put them before the TTS as in any Pipecat bot). Run it against a local server::

    pip install -e '.[pipecat]' 'pipecat-ai[runner,webrtc,cartesia]'
    vexpress-rt serve --model_dir ./model_ckpts --port 8080          # in one shell
    CARTESIA_API_KEY=... python examples/pipecat_bot.py -t webrtc     # in another; open http://localhost:7860/client

`VEXPRESS_URL` (default http://127.0.0.1:8080), `VEXPRESS_API_KEY`, `VEXPRESS_AVATAR_ID`, `VEXPRESS_FPS` (25) and
`CARTESIA_VOICE_ID` change the defaults. Importing this module needs only `pipecat-ai`; the runner (FastAPI) is
imported when it is run.
"""

from __future__ import annotations

import os

from pipecat.frames.frames import TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.runner.types import RunnerArguments, SmallWebRTCRunnerArguments
from pipecat.services.cartesia.tts import CartesiaTTSService
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from vexpress_rt_client import SessionOptions
from vexpress_rt_client.pipecat import VExpressVideoService

GREETING = "Hello! I am a talking head made by vexpress-rt. Send me some text and I will say it."
FPS = int(os.environ.get("VEXPRESS_FPS", "25"))
WIDTH = int(os.environ.get("VEXPRESS_WIDTH", "512"))
HEIGHT = int(os.environ.get("VEXPRESS_HEIGHT", "512"))


def avatar() -> VExpressVideoService:
    return VExpressVideoService(
        url=os.environ.get("VEXPRESS_URL", "http://127.0.0.1:8080"),
        api_key=os.environ.get("VEXPRESS_API_KEY"),
        options=SessionOptions(avatar_id=os.environ.get("VEXPRESS_AVATAR_ID"), fps=FPS),
    )


def tts() -> FrameProcessor:
    return CartesiaTTSService(
        api_key=os.environ["CARTESIA_API_KEY"],
        settings=CartesiaTTSService.Settings(
            voice=os.environ.get("CARTESIA_VOICE_ID", "71a7ad14-091c-4e8e-a314-022ece01c121")
        ),
    )


def transport_params() -> TransportParams:
    # The service queues each image with its audio (`sync_with_audio`): the transport shows frame i when frame i's
    # audio starts, and redraws the current image at the session's fps (not "live", which would skip that queue).
    return TransportParams(
        audio_in_enabled=True,
        audio_out_enabled=True,
        video_out_enabled=True,
        video_out_is_live=False,
        video_out_width=WIDTH,
        video_out_height=HEIGHT,
        video_out_framerate=FPS,
    )


async def run_bot(transport: BaseTransport, runner_args: RunnerArguments) -> None:
    pipeline = Pipeline([transport.input(), tts(), avatar(), transport.output()])
    worker = PipelineWorker(pipeline, params=PipelineParams(audio_out_sample_rate=48000))

    @transport.event_handler("on_client_connected")
    async def on_client_connected(_transport, _client):
        await worker.queue_frame(TTSSpeakFrame(GREETING))

    @transport.event_handler("on_app_message")
    async def on_app_message(_transport, message, _sender):
        text = message.get("text") if isinstance(message, dict) else None
        if text:
            await worker.queue_frame(TTSSpeakFrame(str(text)))

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(_transport, _client):
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(worker)
    await runner.run()


async def bot(runner_args: RunnerArguments) -> None:
    """Entry point of Pipecat's development runner (`pipecat.runner.run.main`), small WebRTC transport."""
    if not isinstance(runner_args, SmallWebRTCRunnerArguments):
        raise ValueError("this example runs on the small WebRTC transport: python examples/pipecat_bot.py -t webrtc")
    transport = SmallWebRTCTransport(webrtc_connection=runner_args.webrtc_connection, params=transport_params())
    await run_bot(transport, runner_args)


if __name__ == "__main__":
    from pipecat.runner.run import main  # FastAPI + the prebuilt client: pip install 'pipecat-ai[runner,webrtc]'

    main()
