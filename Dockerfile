# gb28181 server image: docker build -t gb28181 . && docker run -p 5060:5060/udp -p 5060:5060 -p 8080:8080 -v gbdata:/data gb28181
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY simulators ./simulators
COPY configs ./configs
RUN pip install --no-cache-dir .
ENV GB28181_DATA_DIR=/data
VOLUME /data
EXPOSE 5060/udp 5060/tcp 8080/tcp
CMD ["gb28181", "serve", "--config", "configs/default.yaml"]
