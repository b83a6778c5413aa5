# gb28181 server image: docker build -t gb28181 . && docker run --network host -v gbdata:/data gb28181
# (host networking: devices send RTP to the media workers' ports, rtp_port + i, and viewers
# fetch streams from the workers' viewer ports; see media.* in configs/default.yaml)
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY simulators ./simulators
COPY configs ./configs
# gcc only for the build: the media receive path's C twin (media._fast, setup.py); without a
# compiler the pure-Python path would run instead, at about 1.4x the CPU per packet.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir . \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
ENV GB28181_DATA_DIR=/data
VOLUME /data
EXPOSE 5060/udp 5060/tcp 8080/tcp 30000-30015/udp 30002-30999/tcp
CMD ["gb28181", "serve", "--config", "configs/default.yaml"]
