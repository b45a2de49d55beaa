# vexpress-rt on an NVIDIA GPU. Build: docker build -t vexpress-rt .
# Run:   docker run --gpus all -p 8080:8080 -v $PWD/model_ckpts:/models vexpress-rt
# The model folder (released layout, see README) is mounted at /models; fetch it once with
#   docker run --rm -v $PWD/model_ckpts:/models vexpress-rt download-weights --model_dir /models
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1
# espeak-ng: a text-to-speech command for script text items (serve --tts-command "espeak-ng -w {out} {text}")
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv libgl1 libglib2.0-0 espeak-ng ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY vexpress_rt ./vexpress_rt
COPY streaming ./streaming
COPY server ./server
COPY web_client ./web_client
# PyPI's torch wheel for Linux x86-64 carries CUDA; the gpu extra adds onnxruntime-gpu for face detection.
RUN python3 -m pip install torch==2.13.0 && python3 -m pip install '.[gpu]'

# The installed `server` package finds the page through this (from a checkout it is the web_client/ beside it).
ENV VEXPRESS_MODEL_DIR=/models VEXPRESS_WEB_ROOT=/app/web_client
EXPOSE 8080
ENTRYPOINT ["vexpress-rt"]
# Off loopback the server needs a key: docker run -e VEXPRESS_API_KEY=... (or -e VEXPRESS_INSECURE_NO_AUTH=1 on a
# private network), and -e VEXPRESS_ALLOWED_HOST=name.example when browsers reach it by a DNS name.
CMD ["serve", "--model_dir", "/models", "--host", "0.0.0.0", "--port", "8080"]
